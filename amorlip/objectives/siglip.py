"""SigLIP's pairwise sigmoid loss with a learnable bias (Zhai et al. 2023; open_clip ``SigLipLoss``).

Each rank scores its local images against every global text (label +1 for the matched pair, -1
otherwise) and divides the summed log-sigmoid terms by the *local* batch size, as open_clip does.
Summed over ranks that is W times the single-process loss on the concatenated batch (which divides
by G = W*B), so gradient averaging over ranks reproduces the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amorlip.objectives.clip import as_fp32_scale
from amorlip.objectives.distributed import gather_with_grad, row_offset


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float, group=None) -> torch.Tensor:
    """-(1/B) sum_i sum_j log sigmoid(z_ij (s x_i.y_j + b)), z_ij = +1 if matched else -1; fp32."""
    batch = img.shape[0]
    all_txt = gather_with_grad(txt, group).float()
    x = img.float()
    s = as_fp32_scale(logit_scale, x.device)
    b = as_fp32_scale(logit_bias, x.device)
    logits = s * (x @ all_txt.T) + b
    signs = -torch.ones_like(logits)
    rows = torch.arange(batch, device=x.device)
    signs[rows, rows + row_offset(batch, group)] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch
