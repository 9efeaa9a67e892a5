"""Ship uint8 pixels from the loader, normalise them on the device.

open_clip's training transform ends in ``ToTensor()`` (uint8 -> float in [0, 1]) and
``Normalize(mean, std)``. Run in the loader workers, those two steps turn every image into fp32
before it crosses the worker queue, /dev/shm and the host-to-device copy: 4x the bytes of the
uint8 image (about 150 MB per 256-image batch at 224 px; ~15 GB of shared memory per node with 6
workers, prefetch 2 and 8 ranks). :func:`split_for_device` cuts the transform before ``ToTensor``:
the workers produce uint8 ``[3, H, W]`` tensors (``PILToTensor``) and :class:`DeviceNormalize`
applies the same two steps to the whole batch on the device, with the same arithmetic (``/ 255``,
``- mean``, ``/ std`` in fp32), so the numbers equal the all-in-worker transform bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import transforms as T


class DeviceNormalize:
    """uint8 ``[B, 3, H, W]`` -> fp32 ``(x / 255 - mean) / std``, on whatever device ``x`` is."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # already normalised (e.g. a loader without the split)
            return images
        mean = self.mean.to(images.device, non_blocking=True)
        std = self.std.to(images.device, non_blocking=True)
        return images.float().div_(255.0).sub_(mean).div_(std)


def split_for_device(preprocess: Callable) -> tuple[Callable, DeviceNormalize]:
    """``(host transform giving uint8 tensors, device normaliser)`` from a transform that ends in
    ``ToTensor(), Normalize(mean, std)`` (open_clip's). Raises ``ValueError`` for any other shape,
    naming what it found, rather than guessing."""
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        found = ", ".join(type(s).__name__ for s in steps[-3:]) or type(preprocess).__name__
        raise ValueError(f"expected a Compose ending in ToTensor, Normalize; found {found}")
    normalize = steps[-1]
    host = T.Compose([*steps[:-2], T.PILToTensor()])
    return host, DeviceNormalize(normalize.mean, normalize.std)


def decode_pairs(samples: Sequence[tuple[str, bytes, str]], preprocess: Callable, tokenizer: Callable
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(pixels [N, 3, H, W], tokens [N, L])`` of ``(key, image bytes, caption)`` samples read
    straight from shards (the amortization probe, the validation batch). An image that does not
    decode is left out with its caption; None when none decodes, so each caller names its own set."""
    import io

    from PIL import Image

    pixels, captions = [], []
    for _, data, caption in samples:
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels.append(preprocess(im.convert("RGB")))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            continue
        captions.append(caption)
    if not pixels:
        return None
    return torch.stack(pixels), tokenizer(captions)
