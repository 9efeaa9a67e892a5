"""open_clip models, transforms and tokenizers, plus the project's tiny model configs.

The tiny configs (``amorlip/model_configs/*.json``) are registered with open_clip's own registry, so
``open_clip.create_model("amorlip-demo")`` works anywhere this module was imported; exported weights
load into a plain open_clip model (``runs/{run}/model.pt``, :mod:`amorlip.model_file`). Which names
exist is answered without torch by :mod:`amorlip.model_names`.
"""

from __future__ import annotations

import functools
import json

import open_clip
import torch

from amorlip.model_names import MODEL_CONFIG_DIR, known_model_names


@functools.cache
def register_model_configs() -> None:
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def model_config(name: str) -> dict:
    """The open_clip architecture dict of ``name`` (stored beside exported weights)."""
    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(known_model_names())}")
    return json.loads(json.dumps(cfg))


def create_model(name: str, init_logit_scale: float | None = None, siglip_init_bias: float | None = None,
                 device: str | torch.device = "cpu"):
    """A randomly initialised open_clip model returning dict outputs, with its train/eval transforms.

    ``init_logit_scale`` is s (not log s). ``siglip_init_bias`` adds the learnable logit bias that the
    SigLIP objective needs.
    """
    register_model_configs()
    kwargs = {}
    if init_logit_scale is not None:
        kwargs["init_logit_scale"] = float(torch.log(torch.tensor(init_logit_scale)))
    if siglip_init_bias is not None:
        kwargs["init_logit_bias"] = float(siglip_init_bias)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, output_dict=True, device=device, **kwargs
    )
    return model, preprocess_train, preprocess_val


def get_tokenizer(name: str):
    register_model_configs()
    return open_clip.get_tokenizer(name)


def image_transform(name: str, train: bool):
    """open_clip's train (augmenting) or eval transform for the model's input size."""
    register_model_configs()
    cfg = model_config(name)
    size = cfg["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=train)
