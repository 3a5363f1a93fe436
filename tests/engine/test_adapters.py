"""Blocks of the FrEIA and normflows / memcnn conventions run unchanged."""

import pytest
import torch

from pyramidflow import InvertibleSequential, wrap
from pyramidflow.engine import AffineCoupling, FrEIAAdapter, NormflowsAdapter

from _blocks import (
    FrEIAStyleAffine,
    MemcnnStyleAdditive,
    NormflowsStyleAffine,
    gradients,
    max_relative_error,
)


def test_wrap_recognises_each_convention():
    assert isinstance(wrap(FrEIAStyleAffine(4)), FrEIAAdapter)
    assert isinstance(wrap(NormflowsStyleAffine(4)), NormflowsAdapter)
    assert isinstance(wrap(MemcnnStyleAdditive(4)), NormflowsAdapter)
    block = AffineCoupling(4, 4)
    assert wrap(block) is block


def test_mixed_conventions_match_autograd():
    seq = InvertibleSequential(
        FrEIAStyleAffine(4), AffineCoupling(4, 8), NormflowsStyleAffine(4), MemcnnStyleAdditive(4), FrEIAStyleAffine(4)
    ).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    reference = gradients(seq, (x,), "autograd")
    assert max_relative_error(gradients(seq, (x,), "invertible"), reference) <= 1e-10


def test_foreign_log_dets_are_summed_and_inverted():
    seq = InvertibleSequential(FrEIAStyleAffine(4), NormflowsStyleAffine(4), MemcnnStyleAdditive(4)).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y, logdet = seq(x)
    expected = sum(b.module.log_scale.sum() for b in list(seq.blocks)[:2]) * 25
    assert torch.allclose(logdet, expected.expand(3))
    x_back, logdet_inverse = seq.inverse(y)
    assert torch.allclose(x_back, x) and torch.allclose(logdet_inverse, -logdet)


def test_volume_preserving_foreign_block_carries_no_logdet():
    seq = InvertibleSequential(MemcnnStyleAdditive(4))
    _, logdet = seq(torch.randn(2, 4, 4, 4))
    assert torch.equal(logdet, torch.zeros(2))
    assert not logdet.requires_grad


def test_normflows_block_given_a_tuple_says_so():
    seq = InvertibleSequential(NormflowsStyleAffine(4))
    with pytest.raises(TypeError, match="takes one tensor"):
        seq((torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)))


def test_freia_blocks_refuses_what_is_no_sequence_inn():
    from pyramidflow.engine import freia_blocks

    with pytest.raises(TypeError, match="SequenceINN"):
        freia_blocks(FrEIAStyleAffine(4))


def test_a_block_with_conditions_passes_them_through():
    """A FrEIA-convention block built with dims_c takes its conditions as the levels after its inputs."""

    class Conditional(FrEIAStyleAffine):
        def __init__(self, channels):
            super().__init__(channels)
            self.dims_in, self.dims_c = [(channels, 5, 5)], [(1, 5, 5)]

        def forward(self, x, c=[], rev=False, jac=True):
            if rev:
                return super().forward([x[0] - c[0]], rev=True)
            (y,), logdet = super().forward(x)
            return [y + c[0]], logdet

    seq = InvertibleSequential(Conditional(4), Conditional(4)).double()
    x, c = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 1, 5, 5, dtype=torch.float64)
    (y, c_out), _ = seq((x, c))
    assert torch.equal(c_out, c)
    reference = gradients(seq, (x, c), "autograd")
    assert max_relative_error(gradients(seq, (x, c), "invertible"), reference) <= 1e-10
