"""Foreign couplings (FrEIA, normflows, memcnn) run coupling-aware: autograd's gradients, one subnet evaluation each.

Each adapted class is compared with plain autograd in float64 (inputs, conditions, every parameter,
outputs and log-dets) and the subnet evaluations in backward are counted, so that a silent fall
back to the generic recipe (two evaluations) fails the test.
"""

import sys
import warnings

import pytest
import torch
from torch import nn

from pyramidflow.engine import InvertibleSequential, freia_blocks, register_coupling
from pyramidflow.engine.adapters import FrEIAAdapter, NormflowsAdapter

from _blocks import backward_step, loss_of

DTYPE = torch.float64


def _net(hidden=8, norm=False, dropout=0.0):
    """A subnet constructor: conv3x3-ReLU-conv3x3, optionally with BatchNorm and dropout."""

    def build(c_in, c_out):
        layers = [nn.Conv2d(c_in, hidden, 3, padding=1, bias=not norm)]  # a bias before BatchNorm has no gradient
        layers += [nn.BatchNorm2d(hidden)] if norm else []
        layers += [nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
        layers += [nn.Conv2d(hidden, c_out, 3, padding=1)]
        return nn.Sequential(*layers)

    return build


def _exact_permutations(seq):
    """FrEIA stores its soft permutation in float32; make it orthogonal in float64 so the inverse is exact."""
    for block in seq.blocks:
        module = getattr(block, "module", None)
        if getattr(module, "w_perm", None) is not None and getattr(module, "householder", 0) == 0:
            c = module.w_perm.shape[0]
            q, _ = torch.linalg.qr(torch.randn(c, c, dtype=DTYPE))
            module.w_perm.data = q.reshape(module.w_perm.shape).clone()
            module.w_perm_inv.data = q.T.contiguous().reshape(module.w_perm.shape)


def _step(seq, inputs, mode):
    """Outputs, log-det and the gradients of the inputs and of every trainable parameter, after one step."""
    y, logdet, leaves = backward_step(seq, inputs, mode)
    ys = y if isinstance(y, tuple) else (y,)
    grads = [x.grad for x in leaves] + [p.grad for p in seq.parameters() if p.requires_grad]
    return [t.detach() for t in ys], logdet.detach(), grads


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(params=[None, 1], ids=["samples=auto", "samples=1"])
def samples(request):
    """The adapters' rebuild_samples: chosen from the size (the whole batch at these sizes), or one at a time."""
    return request.param


def _coupling_subnets(seq):
    return [block.module.get_submodule(path) for block in seq.blocks if block.coupling for path in block.coupling.subnets]


def _assert_matches_autograd(seq, inputs, tolerance=1e-10, samples=None):
    """Gradients equal autograd's; with ``samples``, the coupling-aware backward also ran that many at a time."""
    ys_ref, logdet_ref, grads_ref = _step(seq, inputs, "autograd")
    for block in seq.blocks:
        block.rebuild_samples = samples
    batches = []  # the batch of each subnet evaluation with a graph: backward's (the engine's forward has none)
    hooks = [
        m.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
        for m in _coupling_subnets(seq)
    ]
    ys, logdet, grads = _step(seq, inputs, "invertible")
    for hook in hooks:
        hook.remove()
    if samples is None:
        assert set(batches) <= {inputs[0].shape[0]}
    else:
        assert batches and max(batches) <= samples
    assert all(torch.equal(a, b) for a, b in zip(ys, ys_ref))  # forward runs the block's own code
    assert torch.equal(logdet, logdet_ref)
    assert [g is None for g in grads] == [r is None for r in grads_ref]  # GIN leaves its global scale unused
    errors = [_relative(g, r) for g, r in zip(grads, grads_ref) if r is not None]
    assert max(errors) <= tolerance, errors


def _count_subnet_calls(modules):
    """Forward hooks counting calls of each module; returns the counter and the hook handles."""
    counter = {"calls": 0}
    handles = [m.register_forward_hook(lambda *_: counter.__setitem__("calls", counter["calls"] + 1)) for m in modules]
    return counter, handles


def _backward_evaluations(seq, inputs, subnets):
    """Subnet evaluations during one invertible backward (forward's not counted)."""
    seq.mode = "invertible"
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    y, logdet = seq(leaves if len(leaves) > 1 else leaves[0])
    counter, handles = _count_subnet_calls(subnets)
    loss_of(y, logdet).backward()
    for handle in handles:
        handle.remove()
    return counter["calls"]


# ---------------------------------------------------------------- FrEIA
def _freia():
    return (
        pytest.importorskip("FrEIA.modules", reason="FrEIA is not installed (pip install -e '.[dev]')"),
        pytest.importorskip("FrEIA.framework", reason="FrEIA is not installed (pip install -e '.[dev]')"),
    )


SHAPE = (4, 6, 6)
COND = (2, 6, 6)

ALL_IN_ONE_OPTIONS = [
    {},
    {"permute_soft": True},
    {"global_affine_type": "SIGMOID"},
    {"global_affine_type": "EXP", "affine_clamping": 1.5},
    {"gin_block": True},
    {"reverse_permutation": True, "permute_soft": True},
]


def _freia_seq(cls, depth=3, conditional=False, shape=SHAPE, **kwargs):
    cls = getattr(_freia()[0], cls) if isinstance(cls, str) else cls
    dims_c = {"dims_c": [COND]} if conditional else {}
    blocks = [cls([shape], subnet_constructor=_net(), **dims_c, **kwargs) for _ in range(depth)]
    seq = InvertibleSequential(*blocks).to(DTYPE)
    _exact_permutations(seq)
    return seq


def _freia_inputs(conditional, shape=SHAPE):
    x = torch.randn(2, *shape, dtype=DTYPE)
    return (x, torch.randn(2, *COND, dtype=DTYPE)) if conditional else (x,)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("options", ALL_IN_ONE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_all_in_one_block_matches_autograd(options, conditional, samples):
    seq = _freia_seq("AllInOneBlock", conditional=conditional, **options)
    assert all(block.coupling is not None for block in seq.blocks)
    _assert_matches_autograd(seq, _freia_inputs(conditional), samples=samples)


TWO_SIDED = [
    ("GLOWCouplingBlock", {}),
    ("GLOWCouplingBlock", {"clamp_activation": "TANH", "clamp": 1.0}),
    ("GLOWCouplingBlock", {"clamp_activation": "SIGMOID", "split_len": 1}),
    ("GLOWCouplingBlock", {"clamp_activation": nn.functional.softsign}),
    ("RNVPCouplingBlock", {}),
    ("RNVPCouplingBlock", {"clamp_activation": "TANH"}),
    ("NICECouplingBlock", {}),
    ("GINCouplingBlock", {}),
    ("AffineCouplingOneSided", {}),
]


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("cls, options", TWO_SIDED, ids=str)
def test_freia_couplings_match_autograd(cls, options, conditional, samples):
    shape = (5, 6, 6)  # an odd channel count: unequal halves
    seq = _freia_seq(cls, conditional=conditional, shape=shape, **options)
    assert all(block.coupling is not None for block in seq.blocks)
    _assert_matches_autograd(seq, _freia_inputs(conditional, shape), samples=samples)


@pytest.mark.parametrize(
    "cls, per_block", [("AllInOneBlock", 1), ("GLOWCouplingBlock", 2), ("RNVPCouplingBlock", 4), ("NICECouplingBlock", 2)]
)
def test_backward_evaluates_each_subnet_once(cls, per_block):
    """The speed claim, counted: the generic recipe evaluates every subnet twice."""
    seq = _freia_seq(cls, depth=3)
    subnets = [m for block in seq.blocks for name, m in block.module.named_children() if name.startswith(("subnet", "F", "G"))]
    assert len(subnets) == 3 * per_block
    assert _backward_evaluations(seq, _freia_inputs(False), subnets) == 3 * per_block
    for block in seq.blocks:
        block.coupling = None  # the generic recipe, for contrast
    assert _backward_evaluations(seq, _freia_inputs(False), subnets) == 6 * per_block


def test_outputs_and_inverse_unchanged_by_adaptation():
    seq = _freia_seq("AllInOneBlock", conditional=True, permute_soft=True)
    x, c = _freia_inputs(True)
    (y, c_out), logdet = seq((x, c))
    assert torch.equal(c_out, c)
    reference, reference_logdet, total = x, 0, torch.zeros(2, dtype=DTYPE)
    for block in seq.blocks:
        (reference,), j = block.module([reference], c=[c])
        total = total + j
    assert torch.equal(y, reference) and torch.equal(logdet, total)
    (x_back, _), logdet_inverse = seq.inverse((y, c))
    assert _relative(x_back, x) < 1e-12 and torch.allclose(logdet_inverse, -logdet)


def test_sequence_inn_with_conditions_and_soft_permutation_matches_freia():
    """Two conditions, blocks with and without one, soft permutations: FrEIA's own SequenceINN's gradients."""
    Fm, Ff = _freia()
    inn = Ff.SequenceINN(*SHAPE)
    for i in range(4):
        cond = [0, None, 1, 0][i]
        extra = {"cond": cond, "cond_shape": COND} if cond is not None else {}
        inn.append(Fm.AllInOneBlock, subnet_constructor=_net(), permute_soft=True, **extra)
    inn.append(Fm.AllInOneBlock, subnet_constructor=_net(), gin_block=True)
    inn = inn.to(DTYPE)
    seq = InvertibleSequential(*freia_blocks(inn))
    _exact_permutations(seq)
    x, c0, c1 = torch.randn(2, *SHAPE, dtype=DTYPE), torch.randn(2, *COND, dtype=DTYPE), torch.randn(2, *COND, dtype=DTYPE)

    leaves = [t.clone().requires_grad_(True) for t in (x, c0, c1)]
    z, log_jac = inn(leaves[0], c=leaves[1:])
    loss_of(z, log_jac).backward()
    reference = [t.grad for t in leaves] + [p.grad for p in inn.parameters() if p.requires_grad]
    inn.zero_grad(set_to_none=True)

    leaves = [t.clone().requires_grad_(True) for t in (x, c0, c1)]
    (z_ours, *_), logdet = seq(tuple(leaves))
    assert torch.equal(z_ours, z) and torch.equal(logdet, log_jac)
    loss_of(z_ours, logdet).backward()
    ours = [t.grad for t in leaves] + [p.grad for p in inn.parameters() if p.requires_grad]
    assert [g is None for g in ours] == [r is None for r in reference]
    assert max(_relative(g, r) for g, r in zip(ours, reference) if r is not None) <= 1e-10


def test_subclass_and_unknown_option_take_the_generic_path():
    Fm, _ = _freia()

    class MyAllInOne(Fm.AllInOneBlock):
        """A subclass may change the maths: it takes the generic path."""

    seq = _freia_seq(MyAllInOne)
    assert all(isinstance(b, FrEIAAdapter) and b.coupling is None for b in seq.blocks)
    _assert_matches_autograd(seq, _freia_inputs(False))
    odd = Fm.AllInOneBlock([SHAPE], subnet_constructor=_net())
    odd.GIN = "sometimes"  # an option value the entry does not know
    replaced = Fm.GLOWCouplingBlock([SHAPE], subnet_constructor=_net())
    replaced.forward = lambda x, c=[], rev=False, jac=True: Fm.GLOWCouplingBlock.forward(replaced, x, c, rev, jac)
    assert InvertibleSequential(odd)[0].coupling is None
    assert InvertibleSequential(replaced)[0].coupling is None


def test_refused_call_falls_back_with_the_same_gradients():
    """A block that calls its subnet a different number of times in forward and inverse is caught at run time."""
    seq = _freia_seq("GLOWCouplingBlock", depth=2)
    module = seq.blocks[1].module
    original = module._coupling1

    def coupling1_calling_twice(x1, u2, rev=False):
        if not rev:
            module.subnet2(u2)  # an extra call in forward only
        return original(x1, u2, rev)

    module._coupling1 = coupling1_calling_twice
    seq.blocks[1].coupling = seq.blocks[0].coupling  # registered as if it were the plain class
    _assert_matches_autograd(seq, _freia_inputs(False))


def _released_step_gradients(seq, inputs):
    """The input's and every trainable parameter's gradient after an invertible step with release_outputs."""
    seq.mode = "invertible"
    seq.zero_grad(set_to_none=True)
    leaf = inputs[0].clone().requires_grad_(True)
    y, logdet = seq(leaf, release_outputs=True)
    loss_of(y, logdet).backward()
    return [leaf.grad] + [p.grad for p in seq.parameters() if p.requires_grad]


@pytest.mark.parametrize("cls, refuse", [("AllInOneBlock", False), ("GLOWCouplingBlock", False), ("GLOWCouplingBlock", True)])
def test_released_outputs_hold_the_rebuilt_inputs(cls, refuse, monkeypatch):
    """With release_outputs the rebuilt input is written over the output's storage; gradients stay autograd's,
    also when the path is refused after that write (the inverse's result is then used, not the outputs)."""
    from pyramidflow.engine import subnets

    seq = _freia_seq(cls, depth=3)
    if refuse:
        module = seq.blocks[1].module
        original = module._coupling1
        module._coupling1 = lambda x1, u2, rev=False: (module.subnet2(u2), original(x1, u2, rev))[1] if not rev else original(x1, u2, rev)
    x = _freia_inputs(False)
    reference = _step(seq, x, "autograd")[2]
    written = []

    def into_outputs(xs, ys, *args):
        out = subnets_into_outputs(xs, ys, *args)
        written.append(all(o is y for o, y in zip(out, ys)))
        return out

    subnets_into_outputs = subnets._into_outputs
    monkeypatch.setattr(subnets, "_into_outputs", into_outputs)
    ours = _released_step_gradients(seq, x)
    assert max(_relative(g, r) for g, r in zip(ours, reference) if r is not None) <= 1e-10
    assert written == [True] * 3  # every block's rebuilt input went into its output's storage


def test_batch_norm_subnet_matches_autograd_and_updates_statistics_once():
    """anomalib's PatchFlow: BatchNorm in the subnets, training mode."""
    Fm, _ = _freia()
    blocks = [Fm.AllInOneBlock([SHAPE], subnet_constructor=_net(norm=True)) for _ in range(2)]
    blocks += [Fm.GLOWCouplingBlock([SHAPE], subnet_constructor=_net(norm=True))]
    seq = InvertibleSequential(*blocks).to(DTYPE)
    x = _freia_inputs(False)
    start = {k: v.clone() for k, v in seq.state_dict().items()}
    _step(seq, x, "autograd")
    after_autograd = {k: v.clone() for k, v in seq.state_dict().items()}
    seq.load_state_dict(start)
    _step(seq, x, "invertible")
    for key, value in seq.state_dict().items():
        assert torch.equal(value, after_autograd[key]), key
    seq.load_state_dict(start)
    _assert_matches_autograd(seq, x)


@pytest.mark.parametrize("cls, subnets", [("AllInOneBlock", ("subnet",)), ("GLOWCouplingBlock", ("subnet1", "subnet2"))])
def test_dropout_subnets_match_autograd(cls, subnets):
    """One subnet: the inverse evaluates it from the forward's RNG state, as the forward did. GLOW's two run in
    the other order in the inverse: each recorded evaluation replays the state its call started from in forward."""
    Fm, _ = _freia()
    blocks = [getattr(Fm, cls)([SHAPE], subnet_constructor=_net(dropout=0.3)) for _ in range(3)]
    seq = InvertibleSequential(*blocks).to(DTYPE)
    x = _freia_inputs(False)
    torch.manual_seed(5)
    reference = _step(seq, x, "autograd")[2]
    torch.manual_seed(5)
    ours = _step(seq, x, "invertible")[2]
    assert max(_relative(g, r) for g, r in zip(ours, reference)) <= 1e-10
    modules = [getattr(b.module, name) for b in seq.blocks for name in subnets]
    assert _backward_evaluations(seq, x, modules) == len(modules)


def test_subnet_rng_states_kept_only_from_the_engines_forward_to_its_rebuild():
    """Kept under the state the engine captured before the block, taken back in the block's rebuild; nothing
    kept in autograd mode, where no rebuild follows (NOTE [the block's RNG state, named])."""
    Fm, _ = _freia()
    seq = InvertibleSequential(*[Fm.GLOWCouplingBlock([SHAPE], subnet_constructor=_net(dropout=0.3)) for _ in range(2)])
    x = _freia_inputs(False)[0].float()
    seq.mode = "autograd"
    loss_of(*seq(x)).backward()
    assert [len(b._fwd_subnet_rng) for b in seq.blocks] == [0, 0]
    seq.mode = "invertible"
    y, logdet = seq(x)
    assert [len(b._fwd_subnet_rng) for b in seq.blocks] == [1, 1]
    loss_of(y, logdet).backward()
    assert [len(b._fwd_subnet_rng) for b in seq.blocks] == [0, 0]


# ---------------------------------------------------------------- your own class
class _Additive(nn.Module):
    """A normflows / memcnn-convention coupling written by hand."""

    def __init__(self, channels=4):
        super().__init__()
        self.body = nn.Module()
        self.body.net = _net()(channels // 2, channels - channels // 2)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, b + self.body.net(a)], dim=1)

    def inverse(self, y):
        a, b = y.chunk(2, dim=1)
        return torch.cat([a, b - self.body.net(a)], dim=1)


def test_registered_coupling_runs_coupling_aware():
    register_coupling(_Additive, subnets=("body.net",), accepts=lambda m: m.body.net[0].in_channels == 2)
    seq = InvertibleSequential(_Additive(), _Additive(), _Additive(6)).to(DTYPE)
    assert [b.coupling is not None for b in seq.blocks] == [True, True, False]  # accepts() said no to the third
    seq = InvertibleSequential(_Additive(), _Additive()).to(DTYPE)
    x = (torch.randn(2, 4, 5, 7, dtype=DTYPE),)
    _assert_matches_autograd(seq, x)
    assert _backward_evaluations(seq, x, [b.module.body.net for b in seq.blocks]) == 2


def test_register_coupling_refuses_bad_arguments():
    from pyramidflow.engine import AffineCoupling

    with pytest.raises(TypeError, match="reconstruct"):
        register_coupling(AffineCoupling, subnets=("net",))
    with pytest.raises(TypeError, match="attribute paths"):
        register_coupling(_Additive, subnets="body.net")
    with pytest.raises(TypeError, match="nn.Module class"):
        register_coupling(_Additive(), subnets=("body.net",))


# ---------------------------------------------------------------- normflows
def _normflows():
    return pytest.importorskip("normflows", reason="normflows is not installed (pip install -e '.[dev]')")


@pytest.mark.parametrize(
    "options",
    [
        {"scale_map": "exp"},
        {"scale_map": "sigmoid", "split_mode": "channel_inv"},
        {"scale_map": "sigmoid_inv", "split_mode": "checkerboard"},
        {"scale": False},
    ],
    ids=str,
)
def test_normflows_affine_coupling_block_matches_autograd(options, samples):
    nf = _normflows()
    split = options.get("split_mode", "channel")
    c_in = 4 if "checkerboard" in split else 2
    c_out = (4 if "checkerboard" in split else 2) * (2 if options.get("scale", True) else 1)
    blocks = [nf.flows.AffineCouplingBlock(_net()(c_in, c_out), **options) for _ in range(3)]
    seq = InvertibleSequential(*blocks).to(DTYPE)
    assert all(isinstance(b, NormflowsAdapter) and b.coupling is not None for b in seq.blocks)
    x = (torch.randn(2, 4, 6, 6, dtype=DTYPE),)
    _assert_matches_autograd(seq, x, samples=samples)
    assert _backward_evaluations(seq, x, [b.module.flows[1].param_map for b in seq.blocks]) == 3 * (2 if samples else 1)


@pytest.mark.parametrize("use_lu", [True, False])
def test_normflows_glow_block_matches_autograd(use_lu, samples):
    nf = _normflows()
    seq = InvertibleSequential(*[nf.flows.GlowBlock(4, 8, use_lu=use_lu) for _ in range(3)]).to(DTYPE)
    for block in seq.blocks:  # leave the zero initialisation, so that the couplings do something
        nn.init.normal_(block.module.flows[0].flows[1].param_map.net[-1].weight, std=0.1)
    x = (torch.randn(2, 4, 6, 6, dtype=DTYPE),)
    seq(x[0])  # ActNorm's data-dependent initialisation, once
    assert all(b.coupling is not None for b in seq.blocks)
    _assert_matches_autograd(seq, x, samples=samples)
    subnets = [b.module.flows[0].flows[1].param_map for b in seq.blocks]
    assert _backward_evaluations(seq, x, subnets) == 3 * (2 if samples else 1)


# ---------------------------------------------------------------- memcnn
def _memcnn():
    with warnings.catch_warnings():  # memcnn's import silences every UserWarning of the process; keep it local
        return pytest.importorskip("memcnn", reason="memcnn is not installed (pip install --no-deps memcnn)")


@pytest.mark.parametrize("kind", ["additive", "affine naive", "affine sigmoid"])
def test_memcnn_couplings_match_autograd(kind, samples):
    memcnn = _memcnn()
    if kind == "additive":
        make = lambda: memcnn.AdditiveCoupling(Fm=_net()(2, 2))  # noqa: E731
    else:
        adapter = memcnn.AffineAdapterNaive if kind == "affine naive" else memcnn.AffineAdapterSigmoid
        width = 2 if kind == "affine naive" else 4
        make = lambda: memcnn.AffineCoupling(Fm=_net()(2, width), adapter=adapter)  # noqa: E731
    blocks = [make() for _ in range(2)]
    for block in blocks:
        for p in block.parameters():  # small weights: memcnn's affine maps are unclamped
            p.data.mul_(0.3)
    seq = InvertibleSequential(*blocks).to(DTYPE)
    assert all(b.coupling is not None for b in seq.blocks)
    x = (torch.randn(2, 4, 6, 6, dtype=DTYPE),)
    _assert_matches_autograd(seq, x, samples=samples)
    assert _backward_evaluations(seq, x, [m for b in seq.blocks for m in (b.module.Fm, b.module.Gm)]) == 4 * (2 if samples else 1)


def test_memcnn_deprecated_implementation_takes_the_generic_path():
    memcnn = _memcnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        block = memcnn.AdditiveCoupling(Fm=_net()(2, 2), implementation_fwd=0, implementation_bwd=0)
    seq = InvertibleSequential(block).to(DTYPE)
    assert seq.blocks[0].coupling is None


def test_no_foreign_library_imported_by_the_engine():
    import subprocess

    code = (
        "import sys, pyramidflow.engine; "
        "assert not {'FrEIA', 'normflows', 'memcnn'} & set(sys.modules), sorted(m for m in sys.modules if 'FrEIA' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
