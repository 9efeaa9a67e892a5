"""uint8 through the loader, normalised on the device: the same numbers as open_clip's transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from amorlip.data.pixels import DeviceNormalize, split_for_device
from amorlip.models import image_transform


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("train", [True, False])
def test_split_transform_equals_open_clips_bit_for_bit(train):
    full = image_transform("amorlip-tiny", train=train)
    host, normalize = split_for_device(full)
    images = _images()
    torch.manual_seed(5)  # the random crop draws from torch's RNG: replay it for both paths
    expected = torch.stack([full(im) for im in images])
    torch.manual_seed(5)
    shipped = torch.stack([host(im) for im in images])
    assert shipped.dtype == torch.uint8 and shipped.shape == expected.shape
    assert shipped.element_size() * 4 == expected.element_size()  # a quarter of the bytes cross the queue
    assert torch.equal(normalize(shipped), expected)


def test_already_float_batches_pass_through_and_odd_transforms_are_refused():
    normalize = DeviceNormalize([0.5] * 3, [0.25] * 3)
    batch = torch.rand(2, 3, 4, 4)
    assert normalize(batch) is batch
    with pytest.raises(ValueError, match="ToTensor, Normalize"):
        split_for_device(lambda im: im)
