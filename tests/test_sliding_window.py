"""Sliding-window stitching: exact for pointwise models, covering every pixel, padding small images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codemae.eval.sliding_window import sliding_window, window_starts


def test_window_starts_cover_the_image_with_the_last_window_flush():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 2) == [0]


def test_pointwise_model_stitches_to_its_whole_image_prediction():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 3, 1)  # output at a pixel depends on that pixel only
    opt, sar = torch.rand(3, 37, 45), torch.rand(2, 37, 45)

    def predict(crops):
        return conv(torch.cat(crops, 1))

    whole = conv(torch.cat([opt, sar])[None])[0]
    stitched = sliding_window(predict, [opt, sar], window=16, stride=10, batch_size=3)
    torch.testing.assert_close(stitched, whole, rtol=1e-5, atol=1e-6)


def test_patch_resolution_output_and_padding_of_a_small_image():
    image = torch.rand(1, 12, 20)

    def predict(crops):  # mean of each 4x4 patch: a patch-grid "feature map"
        return F.avg_pool2d(crops[0], 4)

    out = sliding_window(predict, [image], window=16, stride=8, out_stride=4)
    assert out.shape == (1, 3, 5)
    torch.testing.assert_close(out, F.avg_pool2d(image[None], 4)[0])


def test_overlap_is_averaged_not_summed():
    calls = iter(range(100))

    def predict(crops):  # each window predicts its own constant: overlaps must average them
        return torch.stack([torch.full((1, 8, 8), float(next(calls))) for _ in crops[0]])

    out = sliding_window(predict, [torch.zeros(1, 8, 12)], window=8, stride=4, batch_size=1)
    assert out[0, 0, 0] == 0 and out[0, 0, -1] == 1 and out[0, 0, 5] == pytest.approx(0.5)


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="different sizes"):
        sliding_window(lambda c: c[0], [torch.zeros(1, 8, 8), torch.zeros(1, 8, 9)], 8, 8)
