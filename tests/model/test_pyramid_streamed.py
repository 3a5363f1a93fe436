"""The streamed (no-graph) Laplacian decomposition: the same levels as the whole-batch one, smaller peak."""

import pytest
import torch

import pyramidflow.model.pyramid as pyramid
from pyramidflow.memory.plan import _LiveBytes
from pyramidflow.model.pyramid import LaplacianPyramid, laplacian_compose, laplacian_decompose


def _whole(x, num_levels, downsample):
    """The differentiable path, forced by an input that requires grad."""
    levels = laplacian_decompose(x.detach().requires_grad_(), num_levels, downsample)
    return [level.detach() for level in levels]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("downsample", ["max", "nearest"])
@pytest.mark.parametrize(
    "shape, num_levels, chunk_elements",
    [((2, 6, 24, 40), 4, 2**20), ((3, 5, 32, 32), 3, 2 * 32 * 32), ((2, 4, 16, 48), 2, 1)],
)
def test_streamed_equals_whole_bit_for_bit(monkeypatch, dtype, downsample, shape, num_levels, chunk_elements):
    """Whole samples, uneven channel chunks (2, 2, 1) and one channel at a time: bitwise equal."""
    monkeypatch.setattr(pyramid, "_CHUNK_ELEMENTS", chunk_elements)
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    want = _whole(x, num_levels, downsample)
    with torch.no_grad():
        streamed = laplacian_decompose(x, num_levels, downsample)
        consumed = laplacian_decompose(x.clone(), num_levels, downsample, consume_input=True)
    streamed_grad_on = laplacian_decompose(x, num_levels, downsample)  # no graph needed: x does not require grad
    for got in (streamed, consumed, streamed_grad_on):
        assert len(got) == num_levels
        for level, expected in zip(got, want):
            assert level.shape == expected.shape and torch.equal(level, expected)


def test_consume_input_writes_level_0_into_the_input_and_only_then():
    x = torch.randn(2, 3, 16, 16)
    kept = x.clone()
    levels = LaplacianPyramid(3).decompose(x)
    assert torch.equal(x, kept) and levels[0].data_ptr() != x.data_ptr()
    consumed = LaplacianPyramid(3).decompose(x, consume_input=True)
    assert consumed[0] is x
    for a, b in zip(consumed, levels):
        assert torch.equal(a, b)
    leaf = kept.clone().requires_grad_()
    with_graph = laplacian_decompose(leaf, 3, consume_input=True)  # a graph: the input is left alone
    assert with_graph[0].data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), kept)


def test_with_a_graph_it_stays_differentiable():
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    levels = laplacian_decompose(x, 3)
    assert all(level.grad_fn is not None for level in levels)
    grad, = torch.autograd.grad(laplacian_compose(levels).sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x), rtol=0, atol=1e-12)  # compose(decompose(x)) = x


def _decompose_peak(decompose):
    """Peak bytes above the input of a no-grad decomposition, counted on the meta device, and the input's bytes."""
    counter = _LiveBytes()
    with torch.device("meta"), torch.no_grad(), counter:
        x = torch.empty(2, 8, 512, 512)
        start = counter.live
        levels = decompose(x)
        del levels
    return counter.peak - start, start


def test_streaming_takes_the_whole_batch_temporaries_away(monkeypatch):
    """Streamed: the levels and one chunk's temporaries; consumed: level 0 is the input's own storage."""
    monkeypatch.setattr(pyramid, "_CHUNK_ELEMENTS", 2**16)  # under one 512 px channel: a channel at a time
    whole, input_bytes = _decompose_peak(lambda x: pyramid._decompose_whole(x, 4, "max"))
    streamed, _ = _decompose_peak(lambda x: laplacian_decompose(x, 4))
    consumed, _ = _decompose_peak(lambda x: laplacian_decompose(x, 4, consume_input=True))
    pyramid_bytes = input_bytes * (1 + 1 / 4 + 1 / 16 + 1 / 64)
    channel = 4 * 512 * 512  # float32 bytes of one full-resolution temporary: one channel of one sample
    # Measured above the input, in input sizes: whole 2.25, streamed 1.47, consumed 0.47 (the levels: 1.33).
    assert whole >= pyramid_bytes + input_bytes / 2  # whole-batch temporaries: the comparison can fail
    assert streamed <= pyramid_bytes + 4 * channel, (streamed, pyramid_bytes)
    assert consumed <= pyramid_bytes - input_bytes + 4 * channel, (consumed, pyramid_bytes)
