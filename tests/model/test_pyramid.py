"""Laplacian decomposition and composition: shapes, exact inverse, size errors."""

import pytest
import torch

from pyramidflow.model.pyramid import LaplacianPyramid, laplacian_compose, laplacian_decompose


@pytest.mark.parametrize("num_levels, height, width", [(2, 6, 10), (4, 24, 40), (8, 128, 384)])
@pytest.mark.parametrize("downsample", ["max", "nearest"])
def test_compose_inverts_decompose(num_levels, height, width, downsample):
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    levels = laplacian_decompose(x, num_levels, downsample)
    assert len(levels) == num_levels
    for i, level in enumerate(levels):
        assert level.shape == (2, 3, height // 2**i, width // 2**i)
    torch.testing.assert_close(laplacian_compose(levels), x, rtol=0, atol=1e-12)


def test_compose_inverts_decompose_float32():
    x = torch.randn(1, 2, 32, 48)
    torch.testing.assert_close(laplacian_compose(laplacian_decompose(x, 4)), x, rtol=0, atol=1e-5)


def test_downsample_options_differ_but_both_invert():
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    by_max = laplacian_decompose(x, 3, "max")
    by_nearest = laplacian_decompose(x, 3, "nearest")
    assert not torch.allclose(by_max[-1], by_nearest[-1])
    torch.testing.assert_close(laplacian_compose(by_nearest), x, rtol=0, atol=1e-12)


def test_levels_are_band_passes_of_a_constant():
    """A constant image (away from the zero-padded border) has no detail: fine levels vanish inside."""
    x = torch.ones(1, 1, 64, 64, dtype=torch.float64)
    levels = laplacian_decompose(x, 3)
    torch.testing.assert_close(levels[0][..., 8:-8, 8:-8], torch.zeros(1, 1, 48, 48, dtype=torch.float64))


@pytest.mark.parametrize(
    "num_levels, size, nearest",
    [(4, (100, 130), "104×128"), (2, (7, 8), "8×8"), (8, (3, 200), "128×256")],
)
def test_bad_size_names_nearest_valid_size(num_levels, size, nearest):
    x = torch.zeros(1, 3, *size)
    with pytest.raises(ValueError, match=f"nearest valid size is {nearest}"):
        laplacian_decompose(x, num_levels)
    with pytest.raises(ValueError, match=f"divisible by 2\\*\\*{num_levels - 1}"):
        LaplacianPyramid(num_levels).decompose(x)


def test_bad_settings():
    with pytest.raises(ValueError, match="downsample"):
        laplacian_decompose(torch.zeros(1, 1, 8, 8), 2, "area")
    with pytest.raises(ValueError, match="num_levels"):
        LaplacianPyramid(0)
    with pytest.raises(ValueError, match="expected 3 levels"):
        LaplacianPyramid(3).compose((torch.zeros(1, 1, 4, 4),))
