"""CLIP's symmetric InfoNCE with global negatives (paper Eq. 3; open_clip's ``ClipLoss``).

The value is open_clip's ``ClipLoss`` (mean of the image->text and text->image cross-entropies),
computed as open_clip does with ``local_loss=True, gather_with_grad=True``: each rank scores its
local rows against all global columns. Summed over ranks this is W times the single-process loss on
the concatenated batch, so DDP/DeepSpeed's 1/W gradient averaging reproduces the single-process
gradient exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amorlip.objectives.distributed import gather_with_grad, row_offset


def as_fp32_scale(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """The logit scale s (or a bias) as a fp32 scalar tensor, keeping its autograd graph."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float,
              group=None) -> torch.Tensor:
    """Mean of the two cross-entropy directions over in-batch (global) negatives, fp32.

    ``img``, ``txt``: L2-normalised ``[B, D]`` local features (row i of each is a matched pair);
    ``logit_scale``: s (not log s); ``group``: process group of the global batch (None = one process).
    """
    batch = img.shape[0]
    all_img = gather_with_grad(img, group).float()
    all_txt = gather_with_grad(txt, group).float()
    x, y = img.float(), txt.float()
    s = as_fp32_scale(logit_scale, x.device)
    labels = torch.arange(batch, device=x.device) + row_offset(batch, group)
    logits_per_image = s * (x @ all_txt.T)
    logits_per_text = s * (y @ all_img.T)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
