"""Which adapted blocks are couplings, and where their subnets are: the coupling-aware backward's registry.

Invertible backward rebuilds a coupling with one evaluation of each subnet instead of two
(:mod:`.subnets`), given only the subnets' attribute paths. This module knows those paths for
the standard couplings of FrEIA, normflows and memcnn, and takes registrations for one's own
classes (:func:`register_coupling`). None of those libraries is imported: a block is matched by
its class's defining module and name, and the class found there must be the block's exact
class (a subclass may change the maths, so it takes the generic path). Each entry also checks
the options it was written for; anything else takes the generic path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import nn

__all__ = ["Coupling", "coupling_for", "register_coupling", "COUPLING_CLASSES"]


def _always(module: nn.Module) -> bool:
    return True


def _never(module: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class Coupling:
    """How to find a coupling's subnets.

    Attributes:
        subnets: attribute paths, under the block, of the modules whose inputs are the same in
            forward and inverse (``"subnet"``, ``"flows.1.param_map"``).
        accepts: whether a given instance has the options this entry was written for.
        changes_subnet_outputs_in_place: the block's maths writes into its subnets' outputs.
        per_sample: whether a given instance's own maths (outside its subnets) treats each sample
            alone now, so that its backward may run a few samples at a time (NOTE [samples alone]
            in :mod:`.sample_chunks`).
    """

    subnets: Tuple[str, ...]
    accepts: Callable[[nn.Module], bool]
    changes_subnet_outputs_in_place: bool = False
    per_sample: Callable[[nn.Module], bool] = _never


_REGISTERED: Dict[type, Coupling] = {}


def register_coupling(
    cls: type,
    subnets: Sequence[str],
    *,
    accepts: Optional[Callable[[nn.Module], bool]] = None,
    changes_subnet_outputs_in_place: bool = False,
    per_sample: bool = False,
) -> None:
    """Run blocks of class ``cls`` coupling-aware: one evaluation of each subnet in backward.

    For a foreign-convention block (FrEIA: ``forward(xs, c=[], rev=False, jac=True)``; normflows /
    memcnn: ``forward(z)`` and ``inverse(z)``) that :class:`InvertibleSequential` adapts. What must
    hold: each named subnet is called as ``subnet(*tensors)``, as often in ``inverse`` as in
    ``forward`` and, call for call, on input of the same values (the coupling property: its
    input is the conditioning half, which passes through); nothing outside the subnets draws
    random numbers. The block's own ``forward`` and ``inverse`` still do all the maths. Only the
    exact class is matched (not subclasses). A call that breaks the rule in counts or shapes is
    caught and takes the generic path; one that breaks it in values is not: check a new
    registration against ``mode="autograd"``.

    Args:
        cls: the block's class.
        subnets: attribute paths of its subnets under the block, e.g. ``("net",)`` or
            ``("coupling.param_map",)``.
        accepts: called with each instance when it is adapted; ``False`` leaves that instance on the
            generic path (an option this registration was not written for). Default: all.
        changes_subnet_outputs_in_place: the block's maths writes into a subnet's output (e.g.
            ``a *= 0.1``); its recorded outputs are then copied where the subnet's graph needs them.
        per_sample: the block's maths treats each sample alone (no statistics or sums over the
            batch): where its subnets do too, backward then runs a few samples at a time, with the
            same gradients and a smaller peak. A wrong ``True`` gives wrong gradients.

    Raises:
        TypeError: ``cls`` is no ``nn.Module`` class, is a pyramidflow ``InvertibleModule`` (give it
            a ``reconstruct`` method instead), or ``subnets`` is not a sequence of names.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pyramidflow.engine import InvertibleSequential, register_coupling
        >>> class Additive(nn.Module):  # normflows / memcnn convention
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Conv2d(2, 2, 3, padding=1)
        ...     def forward(self, x):
        ...         a, b = x.chunk(2, dim=1)
        ...         return torch.cat([a, b + self.net(a)], dim=1)
        ...     def inverse(self, y):
        ...         a, b = y.chunk(2, dim=1)
        ...         return torch.cat([a, b - self.net(a)], dim=1)
        >>> register_coupling(Additive, subnets=("net",))
        >>> flow = InvertibleSequential(Additive(), Additive())
        >>> flow.blocks[0].coupling.subnets
        ('net',)
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_coupling: cls must be an nn.Module class, got {cls!r}.")
    from .block import InvertibleModule

    if issubclass(cls, InvertibleModule):
        raise TypeError(
            f"register_coupling: {cls.__name__} is a pyramidflow InvertibleModule, which the engine runs as is; "
            "give it a reconstruct(ys) method instead (see pyramidflow.engine.AffineCoupling)."
        )
    if isinstance(subnets, str) or not subnets or not all(isinstance(s, str) and s for s in subnets):
        raise TypeError(f"register_coupling: subnets must be a non-empty sequence of attribute paths, got {subnets!r}.")
    if not isinstance(per_sample, bool):
        raise TypeError(f"register_coupling: per_sample must be True or False, got {per_sample!r}.")
    _REGISTERED[cls] = Coupling(
        tuple(subnets), accepts or _always, changes_subnet_outputs_in_place, _always if per_sample else _never
    )


def coupling_for(module: nn.Module) -> Optional[Coupling]:
    """The coupling entry for ``module``'s exact class when the instance has the options it covers, else ``None``."""
    cls = type(module)
    coupling = _REGISTERED.get(cls) or _foreign(cls)
    if coupling is None or _overrides_directions(module) or not _has_subnets(module, coupling.subnets):
        return None
    try:
        accepted = coupling.accepts(module)
    except AttributeError:  # an attribute the entry reads is missing: not the class it was written for
        return None
    return coupling if accepted else None


def _foreign(cls: type) -> Optional[Coupling]:
    key = (cls.__module__, cls.__qualname__)
    coupling = _FOREIGN.get(key)
    library = sys.modules.get(cls.__module__)  # never imported here: a block of the class means it is loaded
    if coupling is None or getattr(library, cls.__qualname__, None) is not cls:
        return None
    return coupling


def _overrides_directions(module: nn.Module) -> bool:
    """An instance whose own ``forward`` / ``inverse`` replace the class's: not the maths an entry was written for."""
    return any(name in vars(module) for name in ("forward", "inverse", "_affine", "_permute", "_coupling1", "_coupling2"))


def _has_subnets(module: nn.Module, paths: Sequence[str]) -> bool:
    """Every path names a module, each a different one (one module under two names is called twice per direction)."""
    try:
        subnets = [module.get_submodule(path) for path in paths]
    except AttributeError:
        return False
    return len({id(m) for m in subnets}) == len(subnets)


def _is(module: object, library: str, qualname: str) -> bool:
    """``module`` is exactly the class ``qualname`` of the (already loaded) module ``library``."""
    return type(module).__module__ == library and type(module).__qualname__ == qualname and (
        getattr(sys.modules.get(library), qualname, None) is type(module)
    )


# FrEIA 0.2 (FrEIA/modules/all_in_one_block.py): `subnet` takes cat(x1, *c) in both directions;
# the permutations, the global affine (SIGMOID / SOFTPLUS / EXP), GIN and the householder
# reflections are parameters, not subnets. `_affine` scales the subnet's output in place.
def _all_in_one_accepts(m: nn.Module) -> bool:
    return (
        isinstance(m.GIN, bool)
        and isinstance(m.householder, int)
        and isinstance(m.reverse_pre_permute, bool)
        and isinstance(m.conditional, bool)
        and list(m.splits) == [m.in_channels - m.in_channels // 2, m.in_channels // 2]
    )


# FrEIA 0.2 (FrEIA/modules/coupling_layers.py): _BaseCouplingBlock.forward splits at split_len1;
# each subnet takes the passive half (plus c) in both directions.
def _two_sided_accepts(m: nn.Module) -> bool:
    return isinstance(m.split_len1, int) and isinstance(m.split_len2, int) and isinstance(m.conditional, bool)


# normflows 1.7 (normflows/flows/affine/coupling.py): AffineCouplingBlock is Split, AffineCoupling, Merge;
# param_map takes z1 of Split in both directions.
_NORMFLOWS_SPLIT_MODES = ("channel", "channel_inv", "checkerboard", "checkerboard_inv")
_NORMFLOWS_SCALE_MAPS = ("exp", "sigmoid", "sigmoid_inv")


def _normflows_coupling_accepts(m: nn.Module) -> bool:
    flows = list(getattr(m, "flows", []))
    return (
        len(flows) == 3
        and _is(flows[0], "normflows.flows.reshape", "Split")
        and _is(flows[1], "normflows.flows.affine.coupling", "AffineCoupling")
        and _is(flows[2], "normflows.flows.reshape", "Merge")
        and flows[0].mode == flows[2].mode
        and flows[0].mode in _NORMFLOWS_SPLIT_MODES
        and flows[1].scale in (True, False)
        and (not flows[1].scale or flows[1].scale_map in _NORMFLOWS_SCALE_MAPS)
    )


# normflows 1.7 (normflows/flows/affine/glow.py): GlowBlock is AffineCouplingBlock, Invertible1x1Conv
# (absent for one channel), ActNorm; only the coupling has a subnet.
def _normflows_glow_accepts(m: nn.Module) -> bool:
    flows = list(getattr(m, "flows", []))
    mixing = flows[1:-1]
    return (
        len(flows) in (2, 3)
        and _is(flows[0], "normflows.flows.affine.coupling", "AffineCouplingBlock")
        and _normflows_coupling_accepts(flows[0])
        and all(_is(f, "normflows.flows.mixing", "Invertible1x1Conv") for f in mixing)
        and _is(flows[-1], "normflows.flows.normalization", "ActNorm")
    )


# Its ActNorm treats each sample alone once its data-dependent initialisation (from the first batch) is done.
def _normflows_glow_per_sample(m: nn.Module) -> bool:
    return bool(m.flows[-1].data_dep_init_done > 0)


# memcnn 1.5 (memcnn/models/additive.py, affine.py): with the default implementation (-1),
# Fm takes x2 and Gm takes y1 in both directions; the deprecated Functions (0, 1) are refused.
def _memcnn_accepts(m: nn.Module) -> bool:
    return m.implementation_fwd == -1 and m.implementation_bwd == -1


# Every entry's maths treats each sample alone (normflows' GlowBlock once its ActNorm is initialised).
_FOREIGN: Dict[Tuple[str, str], Coupling] = {
    ("FrEIA.modules.all_in_one_block", "AllInOneBlock"): Coupling(("subnet",), _all_in_one_accepts, True, _always),
    ("FrEIA.modules.coupling_layers", "GLOWCouplingBlock"): Coupling(
        ("subnet1", "subnet2"), _two_sided_accepts, per_sample=_always
    ),
    ("FrEIA.modules.coupling_layers", "GINCouplingBlock"): Coupling(
        ("subnet1", "subnet2"), _two_sided_accepts, per_sample=_always
    ),
    ("FrEIA.modules.coupling_layers", "RNVPCouplingBlock"): Coupling(
        ("subnet_s1", "subnet_t1", "subnet_s2", "subnet_t2"), _two_sided_accepts, per_sample=_always
    ),
    ("FrEIA.modules.coupling_layers", "NICECouplingBlock"): Coupling(("F", "G"), _two_sided_accepts, per_sample=_always),
    ("FrEIA.modules.coupling_layers", "AffineCouplingOneSided"): Coupling(
        ("subnet",), _two_sided_accepts, per_sample=_always
    ),
    ("normflows.flows.affine.coupling", "AffineCouplingBlock"): Coupling(
        ("flows.1.param_map",), _normflows_coupling_accepts, per_sample=_always
    ),
    ("normflows.flows.affine.glow", "GlowBlock"): Coupling(
        ("flows.0.flows.1.param_map",), _normflows_glow_accepts, per_sample=_normflows_glow_per_sample
    ),
    ("memcnn.models.additive", "AdditiveCoupling"): Coupling(("Fm", "Gm"), _memcnn_accepts, per_sample=_always),
    ("memcnn.models.affine", "AffineCoupling"): Coupling(("Fm", "Gm"), _memcnn_accepts, per_sample=_always),
}

#: The foreign classes that run coupling-aware, as ``"module.Class"``.
COUPLING_CLASSES: Tuple[str, ...] = tuple(f"{module}.{name}" for module, name in _FOREIGN)
