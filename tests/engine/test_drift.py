"""Drift monitoring: a block whose inverse is slightly wrong is caught by every policy."""

import warnings

import pytest
import torch
from torch import nn

from pyramidflow import DriftError, DriftWarning, InvertibleModule, InvertibleSequential
from pyramidflow.engine import AffineCoupling
from pyramidflow.engine.drift import Fingerprinter, default_tolerance, fingerprint_drift

from _blocks import gradients, loss_of, max_relative_error, perturbed_couplings


class SlightlyWrongInverse(AffineCoupling):
    """An affine coupling whose inverse is off by a relative 1e-3: injected drift.

    It takes the generic reconstruct (inverse, then forward), which uses the wrong inverse.
    """

    reconstruct = InvertibleModule.reconstruct

    def inverse(self, ys):
        xs, logdet = super().inverse(ys)
        return tuple(x * (1 + 1e-3) for x in xs), logdet


def _chain(policy, dtype=torch.float64, depth=5, wrong=2, **kwargs):
    torch.manual_seed(0)
    seq = perturbed_couplings(depth, dtype=dtype)
    blocks = list(seq.blocks)
    broken = SlightlyWrongInverse(4, 8, parity=wrong % 2).to(dtype)
    broken.load_state_dict(blocks[wrong].state_dict())
    blocks[wrong] = broken
    return InvertibleSequential(*blocks, drift=policy, **kwargs)


def _x(dtype=torch.float64):
    return torch.randn(2, 4, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))


def _step(seq, x):
    loss_of(*seq(x.clone().requires_grad_(True))).backward()


def test_warn_names_block_error_and_way_out():
    seq = _chain("warn")
    with pytest.warns(DriftWarning) as caught:
        _step(seq, _x())
    (warning,) = [w for w in caught if issubclass(w.category, DriftWarning)]
    message = str(warning.message)
    # The broken block is 2: its input, and every input below it, is rebuilt wrong.
    assert message.startswith("InvertibleSequential: block 2 (SlightlyWrongInverse) is where backward's rebuilt input")
    assert "relative error 0.001 (tolerance 1e-09)" in message
    assert "3 of 5 blocks over" in message
    assert "drift='recompute'" in message and "anchor_every" in message
    assert warning.filename == __file__  # points at the caller's line, not into the engine
    drifts = seq.last_drift
    assert len(drifts) == 5 and all(isinstance(d, float) for d in drifts)
    assert drifts[2] == pytest.approx(1e-3, rel=0.2)  # the injected error, measured from the fingerprint
    assert max(drifts[3:]) < 1e-12  # blocks above the broken one rebuild exactly (float64)
    assert f"the worst is {max(drifts):.3g} at block" in message


def test_warn_once_per_sequence_and_call_site():
    seq = _chain("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss_of(*seq(_x())).backward()  # one call site (this line)
        loss_of(*seq(_x())).backward()  # another call site
        other = _chain("warn")
        for _ in range(2):
            _step(other, _x())  # another sequence
    assert sum(issubclass(w.category, DriftWarning) for w in caught) == 3


def test_raise():
    seq = _chain("raise")
    x = _x().requires_grad_(True)
    with pytest.raises(DriftError, match=r"block 2 \(SlightlyWrongInverse\) is where backward's rebuilt input first drifts"):
        loss_of(*seq(x)).backward()
    assert x.grad is None and all(p.grad is None for p in seq.parameters())
    assert isinstance(DriftError("x"), RuntimeError)


def test_recompute_equals_checkpoint_mode():
    seq = _chain("recompute")
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        healed = gradients(seq, (x,), "invertible")
    assert seq.last_recomputed == (2,)  # only the broken block; the state below it is exact again
    assert seq.last_drift[2] == pytest.approx(1e-3, rel=0.2)
    reference = gradients(seq, (x,), "checkpoint")
    assert max_relative_error(healed, reference) <= 1e-10
    seq.drift = "off"
    assert max_relative_error(gradients(seq, (x,), "invertible"), reference) > 1e-4  # the drift is real


def test_recompute_restarts_from_the_nearest_anchor():
    seq = _chain("recompute", depth=8, wrong=6, anchor_every=4)
    x = _x()
    healed = gradients(seq, (x,), "invertible")
    reference = gradients(seq, (x,), "checkpoint")
    assert max_relative_error(healed, reference) <= 1e-10
    assert seq.last_recomputed == (6,)


def test_anchors_bound_the_compounding():
    seq = _chain("warn", depth=8, wrong=6, anchor_every=4, drift_tolerance=1.0)
    _step(seq, _x())
    drifts = seq.last_drift
    assert drifts[0] == 0.0 and drifts[4] == 0.0  # anchors: exact inputs
    assert drifts[5] > 1e-4 and drifts[6] > 1e-4  # below the broken block, up to the anchor
    assert max(drifts[1:4]) < 1e-12  # the anchor at 4 stopped the drift


def test_off_monitors_nothing():
    seq = _chain("warn")
    with pytest.warns(DriftWarning):
        _step(seq, _x())
    assert seq.last_drift is not None
    seq.drift = "off"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        _step(seq, _x())
    assert seq.last_drift is None and seq.last_recomputed == ()


def test_no_false_warning_on_a_healthy_float32_chain():
    seq = perturbed_couplings(16, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        _step(seq, torch.randn(2, 4, 16, 16))
    assert len(seq.last_drift) == 16
    assert 0 < max(seq.last_drift) < default_tolerance(torch.float32) / 10


def test_settings_are_attributes_and_validated():
    seq = InvertibleSequential(AffineCoupling(4, 8))
    assert (seq.drift, seq.drift_tolerance, seq.anchor_every, seq.last_drift) == ("warn", None, None, None)
    seq.drift = "recompute"
    seq.drift_tolerance = 1e-6
    seq.anchor_every = 2
    assert (seq.drift, seq.drift_tolerance, seq.anchor_every) == ("recompute", 1e-6, 2)
    with pytest.raises(ValueError, match=r"drift must be one of .*'often'"):
        seq.drift = "often"
    with pytest.raises(ValueError, match="drift_tolerance must be a relative error >= 0"):
        InvertibleSequential(AffineCoupling(4, 8), drift_tolerance=-1.0)
    with pytest.raises(ValueError, match="anchor_every must be a block count >= 1"):
        InvertibleSequential(AffineCoupling(4, 8), anchor_every=0)


def test_default_tolerances_per_dtype():
    assert default_tolerance(torch.float64) < default_tolerance(torch.float32) < default_tolerance(torch.bfloat16)
    assert default_tolerance(torch.float16) == default_tolerance(torch.bfloat16)


def test_fingerprint_sees_every_element_deterministically():
    x = torch.randn(3, 5, 37, 53, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).transpose(2, 3)
    a, b = Fingerprinter(), Fingerprinter()
    (fingerprint,) = a.fingerprint((x,))
    assert fingerprint.shape == (3, 5, a.size) and fingerprint.dtype == torch.float64
    assert torch.equal(fingerprint, b.fingerprint((x,))[0])
    assert a.fingerprint((x.float(),))[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # forward may run under autocast: the fingerprint does not
        assert torch.equal(fingerprint, a.fingerprint((x,))[0])
    for index in [(0, 0, 0, 0), (2, 4, 52, 36), (1, 3, 17, 29)]:  # corners and the middle
        wrong = x.clone()
        wrong[index] += 1e-2
        # One wrong element moves each of its row's k projections by exactly its error.
        expected = 1e-2 * a.size**0.5 / float(fingerprint.norm())
        assert float(fingerprint_drift(a, (wrong,), (fingerprint,))) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(a.fingerprint((torch.tensor(2.0),))[0], torch.tensor([2.0]))


class OnePixelWrong(InvertibleModule):
    """``y = a x``, whose inverse adds 0.5 at one pixel of every channel (issue 27): a local inverse error."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.5))

    def forward(self, xs):
        return (self.a * xs[0],), None

    def inverse(self, ys):
        x = ys[0] / self.a
        x[:, :, 3, 5] += 0.5
        return (x,), None


@pytest.mark.parametrize("size", [16, 64])
def test_a_few_wrong_pixels_are_caught_at_any_size(size):
    torch.manual_seed(0)
    seq = InvertibleSequential(AffineCoupling(4, 8), OnePixelWrong(), AffineCoupling(4, 8, parity=1), drift="raise")
    x = torch.randn(2, 4, size, size)
    with pytest.raises(DriftError, match=r"block 1 \(OnePixelWrong\) is where backward's rebuilt input first drifts"):
        _step(seq, x)
    seq.drift, seq.drift_tolerance = "warn", 1.0
    _step(seq, x)
    true_error = 0.5 * 8**0.5 / float(x.norm())  # 8 wrong elements (2 samples x 4 channels) of 0.5
    assert seq.last_drift[1] == pytest.approx(true_error, rel=0.5)  # an estimate from k projections per (n, c)


def test_anchor_modified_in_place_raises():
    seq = perturbed_couplings(3, dtype=torch.float64)
    seq.drift = "recompute"
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y, logdet = seq(x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="input of block 0, kept for drift='recompute'.*modified in place"):
        loss_of(y, logdet).backward()


def _bf16_chain():
    torch.manual_seed(0)
    seq = InvertibleSequential(*[AffineCoupling(4, 8, parity=i % 2) for i in range(6)])
    for block in seq.blocks:
        nn.init.normal_(block.net[-1].weight, std=0.1)
    return seq


def _bf16_gradients(seq, x, mode, drift="warn"):
    seq.mode, seq.drift = mode, drift
    seq.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = seq(x)
        loss = loss_of(y.float(), logdet.float())
    loss.backward()
    return [p.grad for p in seq.parameters()]


def test_bf16_autocast_monitoring_against_autograd_under_the_same_autocast():
    seq = _bf16_chain()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = _bf16_gradients(seq, x, "autograd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)  # the bf16 default tolerance: no false warning
        monitored = _bf16_gradients(seq, x, "invertible")
    assert len(seq.last_drift) == 6 and max(seq.last_drift) < default_tolerance(torch.bfloat16)
    # bf16 has 8 bits of mantissa: the networks' (s, t) round at that level in both runs.
    assert max_relative_error(monitored, reference) <= 0.1
    # "recompute" with a tight tolerance rebuilds every drifting input exactly: checkpoint mode's gradients.
    seq.drift_tolerance = 0.0
    healed = _bf16_gradients(seq, x, "invertible", drift="recompute")
    assert len(seq.last_recomputed) > 0
    assert max_relative_error(healed, _bf16_gradients(seq, x, "checkpoint")) <= 1e-6


def test_inverse_affine_step_runs_in_float32_for_16_bit_operands():
    from pyramidflow import kernels

    generator = torch.Generator().manual_seed(0)
    y, s, t = (torch.randn(2, 3, 5, 7, generator=generator) for _ in range(3))
    y16, s16, t16 = y.bfloat16(), s.bfloat16(), t.bfloat16()
    x = kernels.reference.scale_shift_inverse(y16, s16, t16)
    assert x.dtype == torch.bfloat16
    once = ((y16.float() - t16.float()) / torch.exp(s16).float()).bfloat16()  # one rounding, at the end
    assert torch.equal(x, once)
    assert not torch.equal(x, (y16 - t16) / torch.exp(s16))  # bf16 arithmetic rounds twice
