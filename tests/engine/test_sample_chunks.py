"""A coupling's backward a few samples at a time: only where exact, autograd's gradients, a smaller peak.

The class-by-class comparisons with chunks of one sample are in test_foreign_couplings.py (``samples=1``);
here: which blocks are chunked and which keep the whole batch, uneven chunks, released outputs,
autocast, the chunk choice, and the peak counted from the profiler's allocation events.
"""

import pytest
import torch
from torch import nn

from pyramidflow.engine import InvertibleSequential, register_coupling
from pyramidflow.engine.sample_chunks import CHUNK_ELEMENTS, rebuild_chunks, treats_samples_alone
from pyramidflow.memory import peak_memory

from _blocks import bf16_autocast_step, loss_of
from test_foreign_couplings import (
    DTYPE,
    SHAPE,
    _assert_matches_autograd,
    _coupling_subnets,
    _freia,
    _freia_inputs,
    _freia_seq,
    _net,
    _relative,
    _released_step_gradients,
    _step,
)


def _backward_batches(seq, inputs, samples):
    """The batch of each subnet evaluation in one invertible backward with ``rebuild_samples=samples``."""
    for block in seq.blocks:
        block.rebuild_samples = samples
    seq.mode = "invertible"
    y, logdet = seq(inputs if len(inputs) > 1 else inputs[0])
    batches = []
    hooks = [m.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0])) for m in _coupling_subnets(seq)]
    loss_of(y, logdet).backward()
    for hook in hooks:
        hook.remove()
    return batches


@pytest.mark.parametrize("cls, conditional", [("AllInOneBlock", True), ("GLOWCouplingBlock", False), ("RNVPCouplingBlock", True)])
def test_uneven_chunks_match_autograd(cls, conditional):
    """A batch of 3 in chunks of 2: the last chunk is smaller."""
    seq = _freia_seq(cls, conditional=conditional, permute_soft=True) if cls == "AllInOneBlock" else _freia_seq(cls, conditional=conditional)
    x = tuple(torch.cat([t, t[:1] + 0.5]) for t in _freia_inputs(conditional))
    _assert_matches_autograd(seq, x, samples=2)
    assert sorted(set(_backward_batches(seq, x, 2))) == [1, 2]


@pytest.mark.parametrize("cls", ["AllInOneBlock", "GLOWCouplingBlock"])
def test_released_outputs_with_chunks_match_autograd(cls):
    """release_outputs: each chunk's input is written over its output's rows, its gradient over the incoming one's."""
    seq = _freia_seq(cls, depth=3)
    x = _freia_inputs(False)
    reference = _step(seq, x, "autograd")[2]
    for block in seq.blocks:
        block.rebuild_samples = 1
    ours = _released_step_gradients(seq, x)
    assert max(_relative(g, r) for g, r in zip(ours, reference)) <= 1e-10


def test_batch_norm_in_training_keeps_the_whole_batch():
    """Batch statistics mix the samples: chunks would change them. BatchNorm in eval mode uses running
    statistics, so each sample is alone and the block is chunked."""
    Fm, _ = _freia()
    blocks = [Fm.AllInOneBlock([SHAPE], subnet_constructor=_net(norm=True)) for _ in range(2)]
    blocks += [Fm.GLOWCouplingBlock([SHAPE], subnet_constructor=_net(norm=True))]
    seq = InvertibleSequential(*blocks).to(DTYPE)
    x = _freia_inputs(False)
    _assert_matches_autograd(seq, x, samples=None)
    assert set(_backward_batches(seq, x, 1)) == {2}
    seq.eval()
    _assert_matches_autograd(seq, x, samples=1)


def test_dropout_in_training_keeps_the_whole_batch():
    """A chunk would draw other random numbers than the forward's whole batch did."""
    Fm, _ = _freia()
    seq = InvertibleSequential(*[Fm.GLOWCouplingBlock([SHAPE], subnet_constructor=_net(dropout=0.3)) for _ in range(2)])
    seq = seq.to(DTYPE)
    x = _freia_inputs(False)
    for block in seq.blocks:
        block.rebuild_samples = 1
    torch.manual_seed(5)
    reference = _step(seq, x, "autograd")[2]
    torch.manual_seed(5)
    ours = _step(seq, x, "invertible")[2]
    assert max(_relative(g, r) for g, r in zip(ours, reference)) <= 1e-10
    assert set(_backward_batches(seq, x, 1)) == {2}


class _Doubled(nn.Module):
    """A module of one's own: its forward is not known to treat each sample alone."""

    def forward(self, x):
        return 2 * x


def test_subnet_with_a_module_of_ones_own_keeps_the_whole_batch():
    Fm, _ = _freia()

    def build(c_in, c_out):
        return nn.Sequential(_net()(c_in, c_out), _Doubled())

    seq = InvertibleSequential(*[Fm.AllInOneBlock([SHAPE], subnet_constructor=build) for _ in range(2)]).to(DTYPE)
    assert not treats_samples_alone(seq.blocks[0].module.subnet)
    x = _freia_inputs(False)
    _assert_matches_autograd(seq, x, samples=None)
    assert set(_backward_batches(seq, x, 1)) == {2}


class _AdditivePerSample(nn.Module):
    """A normflows / memcnn-convention additive coupling whose maths treats each sample alone."""

    def __init__(self, channels=4):
        super().__init__()
        self.net = _net()(channels // 2, channels - channels // 2)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, b + self.net(a)], dim=1)

    def inverse(self, y):
        a, b = y.chunk(2, dim=1)
        return torch.cat([a, b - self.net(a)], dim=1)


def test_registered_coupling_is_chunked_only_when_declared_per_sample():
    x = (torch.randn(3, 4, 5, 7, dtype=DTYPE),)
    register_coupling(_AdditivePerSample, subnets=("net",))
    seq = InvertibleSequential(_AdditivePerSample(), _AdditivePerSample()).to(DTYPE)
    assert set(_backward_batches(seq, x, 1)) == {3}
    register_coupling(_AdditivePerSample, subnets=("net",), per_sample=True)
    seq = InvertibleSequential(_AdditivePerSample(), _AdditivePerSample()).to(DTYPE)
    _assert_matches_autograd(seq, x, samples=1)
    with pytest.raises(TypeError, match="per_sample"):
        register_coupling(_AdditivePerSample, subnets=("net",), per_sample="yes")


def test_normflows_glow_block_is_per_sample_once_act_norm_is_initialised():
    nf = pytest.importorskip("normflows", reason="normflows is not installed (pip install -e '.[dev]')")
    seq = InvertibleSequential(nf.flows.GlowBlock(4, 8)).to(DTYPE)
    block = seq.blocks[0]
    assert not block.coupling.per_sample(block.module)  # its first batch sets ActNorm's scale and shift
    seq(torch.randn(2, 4, 6, 6, dtype=DTYPE))
    assert block.coupling.per_sample(block.module)


def test_chunks_replay_the_forward_autocast():
    """The chunks run in the engine's local backward, after its rebuild context: each evaluation still runs
    under the forward's autocast."""
    Fm, _ = _freia()
    seq = InvertibleSequential(*[Fm.AllInOneBlock([SHAPE], subnet_constructor=_net()) for _ in range(2)])
    dtypes = []
    for subnet in _coupling_subnets(seq):
        subnet.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    for block in seq.blocks:
        block.rebuild_samples = 1
    x = torch.randn(2, *SHAPE)
    results = {}
    for mode in ("autograd", "invertible"):
        bf16_autocast_step(seq, x, mode)
        results[mode] = [p.grad for p in seq.parameters() if p.grad is not None]
    assert len(dtypes) == 2 * (1 + 1 + 2) and set(dtypes) == {torch.bfloat16}  # autograd; forward and 2 chunks
    # bf16 has 8 bits of mantissa: the reconstruction from bf16 outputs rounds at that level.
    assert max(_relative(g, r) for g, r in zip(results["invertible"], results["autograd"])) <= 0.1


def test_chunks_chosen_from_the_size():
    big = torch.empty(4, 16, 128, 128)  # 262,144 elements a sample: one sample a chunk
    assert rebuild_chunks((big,)) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]
    per_chunk = CHUNK_ELEMENTS // (4 * 16 * 16)  # samples of (4, 16, 16) that make one chunk
    small = torch.empty(3 * per_chunk, 4, 16, 16)
    assert rebuild_chunks((small,)) == [slice(i * per_chunk, (i + 1) * per_chunk) for i in range(3)]
    assert rebuild_chunks((torch.empty(2, 4, 6, 6),)) is None  # the whole batch is less than a chunk
    assert rebuild_chunks((torch.empty(4, 4, 6, 6),), samples=3) == [slice(0, 3), slice(3, 4)]
    assert rebuild_chunks((big, torch.empty(1, 2, 8, 8)), samples=1) is None  # a level of another batch


@pytest.mark.parametrize("samples", [0, 1.5, True])
def test_bad_rebuild_samples_raises(samples):
    seq = _freia_seq("AllInOneBlock", depth=1)
    seq.blocks[0].rebuild_samples = samples
    y, logdet = seq(_freia_inputs(False)[0])
    with pytest.raises(ValueError, match="rebuild_samples must be a positive int or None"):
        loss_of(y, logdet).backward()


def test_backward_peak_falls_with_the_chunk():
    """Counted from the profiler's allocation events (deterministic): one block's subnet graph (hidden
    activations and their gradients) sets the backward's peak, and it is a chunk's, not the batch's."""
    peaks = {}
    x = torch.randn(4, 4, 24, 24, dtype=DTYPE)
    for samples in (None, 2, 1):
        torch.manual_seed(0)
        seq = _freia_seq("AllInOneBlock", depth=2, shape=(4, 24, 24))
        for block in seq.blocks:
            block.rebuild_samples = samples
        y, logdet = seq(x)
        peaks[samples], _ = peak_memory(loss_of(y, logdet).backward, "cpu")
    assert peaks[1] < peaks[2] < peaks[None], peaks


def test_frozen_first_block_keeps_the_whole_batch():
    """A block whose backward computes nothing (no trainable parameter, an input without grad) never runs its
    local backward, so it cannot rebuild there: its input, which drift monitoring reads, is rebuilt at once."""
    seq = _freia_seq("AllInOneBlock", depth=2)
    seq.drift = "raise"
    for p in seq.blocks[0].parameters():
        p.requires_grad_(False)
    x = _freia_inputs(False)[0]
    reference = _step(seq, (x,), "autograd")[2][1:]  # the input's gradient is not asked below
    for block in seq.blocks:
        block.rebuild_samples = 1
    seq.mode = "invertible"
    seq.zero_grad(set_to_none=True)
    loss_of(*seq(x)).backward()
    ours = [p.grad for p in seq.parameters() if p.requires_grad]
    assert max(_relative(g, r) for g, r in zip(ours, reference)) <= 1e-10
    assert max(seq.last_drift) < 1e-12


def test_act_norm_initialised_by_the_first_step_then_chunked():
    """normflows' ActNorm sets its scale and shift from the first batch it sees, in the engine's forward; the
    same step's backward already runs one sample at a time, with autograd's gradients."""
    import copy

    nf = pytest.importorskip("normflows", reason="normflows is not installed (pip install -e '.[dev]')")
    torch.manual_seed(0)
    seq = InvertibleSequential(*[nf.flows.GlowBlock(4, 8) for _ in range(2)]).to(DTYPE)
    for block in seq.blocks:  # leave the zero initialisation, so that the couplings do something
        nn.init.normal_(block.module.flows[0].flows[1].param_map.net[-1].weight, std=0.1)
    twin = copy.deepcopy(seq)
    x = torch.randn(3, 4, 6, 6, dtype=DTYPE)
    reference = _step(twin, (x,), "autograd")[2]
    for block in seq.blocks:
        block.rebuild_samples = 1
    batches = _backward_batches(seq, (x,), 1)
    ours = [p.grad for p in seq.parameters() if p.requires_grad]
    assert set(batches) == {1}
    assert max(_relative(g, r) for g, r in zip(ours, reference[1:])) <= 1e-10
