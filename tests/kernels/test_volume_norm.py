"""The VN reduction kernels (kernels/triton/volume_norm.py) against torch means, under the interpreter without CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton cannot be imported: the Triton kernels cannot run here")

from pyramidflow.kernels import reference  # noqa: E402

from pyramidflow.kernels.triton import _launch  # noqa: E402
from pyramidflow.kernels.triton import volume_norm as _vn  # noqa: E402

# (dtype, atol, rtol): inputs are rounded to the dtype, the sums run in float32 in both
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-6, 1e-5), (torch.float16, 1e-6, 1e-5)]


def _expected(volume_norm, r, y, t, g):
    dims = reference.volume_norm_dims(volume_norm)
    r, y, t, g = (a.float() for a in (r, y, t, g))
    mean_s = reference.soft_clamp(r, 2.0).mean(dim=dims).reshape(-1)
    mean_grad = (g * (y - t)).mean(dim=dims).reshape(-1)
    return mean_s, mean_grad


def _inputs(shape, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(scale * torch.randn(shape)).to(dtype).contiguous(memory_format=fmt) for scale in (2.0, 1.0, 1.0, 1.0)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 4, 37, 53)], ids=["1x3x5x7", "2x4x37x53"])
def test_means_match_torch(shape, volume_norm, channels_last, dtype, atol, rtol):
    r, y, t, g = _inputs(shape, dtype, channels_last)
    mean_s, mean_grad = _vn.volume_norm_means(volume_norm, 2.0, r=r, y=y, t=t, g=g)
    want_s, want_grad = _expected(volume_norm, r, y, t, g)
    assert mean_s.dtype == torch.float32 and mean_s.shape == want_s.shape
    torch.testing.assert_close(mean_s, want_s, atol=atol, rtol=rtol)
    torch.testing.assert_close(mean_grad, want_grad, atol=atol, rtol=rtol)
    only_s, none = _vn.volume_norm_means(volume_norm, 2.0, r=r)
    assert none is None
    torch.testing.assert_close(only_s, mean_s, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_split_reduction_with_small_tiles(volume_norm, monkeypatch):
    """Many splits, several group tiles and partial last tiles, as on a GPU with many multiprocessors."""
    monkeypatch.setattr(_launch, "reduction_blocks", lambda n_groups, n_members, device: (4, 16, -(-n_members // 48), 48))
    r, y, t, g = _inputs((3, 5, 7, 9), torch.float32, False)
    mean_s, mean_grad = _vn.volume_norm_means(volume_norm, 2.0, r=r, y=y, t=t, g=g)
    want_s, want_grad = _expected(volume_norm, r, y, t, g)
    torch.testing.assert_close(mean_s, want_s, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean_grad, want_grad, atol=1e-6, rtol=1e-5)


def test_reduction_blocks_cover_every_member():
    for n_groups, n_members in [(16, 2 * 1024 * 1024), (1024 * 1024, 32), (5, 3), (1961, 8)]:
        block_g, block_m, splits, chunk = _launch.reduction_blocks(n_groups, n_members, torch.device("cpu"))
        assert chunk % block_m == 0 and splits * chunk >= n_members > (splits - 1) * chunk
        assert block_g & (block_g - 1) == 0 and block_m & (block_m - 1) == 0
