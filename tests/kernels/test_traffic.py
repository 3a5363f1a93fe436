"""kernels/_traffic.py: the bytes each kernel moves, as the kernel module's docstring states them."""

from __future__ import annotations

import re

import pytest

from pyramidflow.kernels import _traffic


def test_bytes_per_element_follow_the_docstring_of_the_kernels():
    pytest.importorskip("triton")
    from pyramidflow.kernels.triton import affine_coupling  # noqa: PLC0415  (imports triton)

    doc = affine_coupling.__doc__
    stated = {
        "forward": int(re.search(r"forward: minimum (\d+)", doc).group(1)),
        "affine_coupling_bwd": int(re.search(r"fused backward ``affine_coupling_bwd``: minimum (\d+)", doc).group(1)),
        "autograd backward": int(re.search(r"backward of the autograd binding: (\d+)", doc).group(1)),
        "reconstruct backward": int(re.search(r"``affine_coupling_reconstruct`` then its backward: (\d+)", doc).group(1)),
    }
    for launch, passes in stated.items():
        kernel = "_affine_coupling_kernel" if launch == "forward" else "_affine_coupling_bwd_kernel"
        assert _traffic.bytes_per_element(kernel, launch) == 4 * passes
        assert _traffic.bytes_per_element(kernel, launch, "bfloat16") == 2 * passes


def test_roofline_rows_scale_with_bandwidth():
    rows = {(r["kernel"], r["launch"]): r for r in _traffic.roofline_rows(shape=(1, 1, 10, 10))}
    forward = rows[("_affine_coupling_kernel", "forward")]
    assert forward["bytes"] == 16 * 100
    assert forward["seconds"]["RTX 3060"] == pytest.approx(1600 / 360e9)
    assert forward["seconds"]["H200"] < forward["seconds"]["RTX 4090"] < forward["seconds"]["RTX 3060"]
