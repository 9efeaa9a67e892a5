"""model.pt: weights_only loading, a stock open_clip model, the trainer's embeddings, the lambda nets."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
from train_configs import ensure_trained, shared_root

from amorlip.amortizer import LambdaNet
from amorlip.config import load_config
from amorlip.model_file import FORMAT, load_exported
from amorlip.train.checkpoint import latest_complete_tag
from amorlip.train.engine import scalar_params_to_1d
from amorlip.train.export import export

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = shared_root(tmp_path_factory)
    ensure_trained(root, "amor")
    return root


def _fixed_inputs(image_size: int, context_length: int):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, image_size, image_size, generator=gen)
    texts = torch.randint(1, 1000, (4, context_length), generator=gen)
    return images, texts


@torch.no_grad()
def _embed(model, images, texts):
    model.eval()
    return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)


def test_export_loads_in_plain_open_clip_with_the_trainers_embeddings(root):
    config = load_config(root / "config.yaml")
    path = export(config, "amor")
    assert path == root / "runs" / "amor" / "model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT and payload["model_name"] == "amorlip-tiny"
    assert payload["step"] == 24 and payload["checkpoint_tag"] == "step-0000024"
    assert payload["run"]["method"] == "amorlip" and payload["variant"] == "published"
    assert all(v.dtype == torch.float32 for v in payload["state_dict"].values() if v.is_floating_point())

    # stock open_clip, no amorlip code involved in building the model
    cfg = payload["model_config"]
    plain = open_clip.CLIP(**cfg, **payload["model_kwargs"])
    plain.load_state_dict(payload["state_dict"], strict=True)

    # the trainer's own module, as the DeepSpeed engine held it at the last checkpoint
    ckpt_dir = root / "runs" / "amor" / "checkpoints"
    module = torch.load(ckpt_dir / latest_complete_tag(ckpt_dir) / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    trainer_model = open_clip.CLIP(**cfg)
    scalar_params_to_1d(trainer_model)  # as the trainer holds logit_scale for DeepSpeed
    trainer_model.load_state_dict(module, strict=True)

    images, texts = _fixed_inputs(cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"])
    img_a, txt_a = _embed(plain, images, texts)
    img_b, txt_b = _embed(trainer_model, images, texts)
    torch.testing.assert_close(img_a, img_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt_a, txt_b, rtol=0, atol=1e-6)
    # and the weights did move away from a fresh initialisation
    fresh = open_clip.CLIP(**cfg)
    assert not torch.allclose(_embed(fresh, images, texts)[0], img_a)

    # the evaluator's entry point gives the same model, in eval mode, with its transform and tokenizer
    model, preprocess, tokenizer, meta = load_exported(path)
    assert not model.training and "state_dict" not in meta and meta["step"] == 24
    img_c, txt_c = _embed(model, images, texts)
    torch.testing.assert_close(img_c, img_a, rtol=0, atol=1e-6)
    tokens = tokenizer(["a red square"])
    assert tokens.shape == (1, cfg["text_cfg"]["context_length"])
    from PIL import Image

    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, cfg["vision_cfg"]["image_size"],
                                                             cfg["vision_cfg"]["image_size"])


def test_export_carries_the_ema_lambda_nets(root):
    config = load_config(root / "config.yaml")
    payload = torch.load(export(config, "amor"), map_location="cpu", weights_only=True)
    nets = payload["lambda_nets"]
    assert set(nets) == {"image", "text"}
    dim = payload["model_config"]["embed_dim"]
    features = torch.nn.functional.normalize(torch.randn(5, dim), dim=-1)
    for state in nets.values():
        net = LambdaNet(dim, hidden_factor=payload["run"]["amorlip"]["lambda_hidden_factor"])
        net.load_state_dict(state, strict=True)
        out = net(features)
        assert out.shape == (5,) and torch.isfinite(out).all()
    assert not torch.equal(nets["image"]["head.weight"], nets["text"]["head.weight"])


def test_export_without_checkpoint_says_what_to_do(root, tmp_path):
    config = load_config(root / "config.yaml")
    config["paths"]["runs"] = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="amorlip train"):
        export(config, "amor")


def test_zero_stage_3_siglip_trains_and_exports(root):
    """Stage 3 partitions the weights (its own checkpoint layout); SigLIP adds a logit bias."""
    ensure_trained(root, "z3")
    config = load_config(root / "config.yaml")
    model, _, _, meta = load_exported(export(config, "z3"))
    assert meta["step"] == 6 and meta["run"]["zero_stage"] == 3 and meta["lambda_nets"] is None
    # the clamp reached the partitioned fp32 master weight (s starts at 14.3 > max 10)
    assert float(model.logit_scale.detach()) <= math.log(10.0) + 1e-6
    assert meta["model_kwargs"] == {"init_logit_bias": -10.0} and model.logit_bias.shape == ()
    assert float(model.logit_bias.detach()) != -10.0  # trained
