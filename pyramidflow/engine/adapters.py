"""Adapters: blocks written for other flow libraries, run unchanged by the engine.

Two foreign conventions are recognised:

* FrEIA (also anomalib's FastFlow, CFlow, CS-Flow, U-Flow blocks):
  ``module(xs: list, c=[], rev=False, jac=True) -> (outputs, log_jac_det)``.
* normflows / memcnn: ``forward(z)`` and ``inverse(z)`` on one tensor, each
  returning ``(z, log_det)`` or just a tensor (then the block preserves volume).

Neither library is a dependency: detection looks at the call signature. A FrEIA block built
with conditions (``dims_c``) takes them as extra levels after its inputs and passes them through
unchanged; :func:`freia_blocks` adapts a FrEIA ``SequenceINN`` block by block. Adapted couplings
of the standard classes (:mod:`.foreign_couplings`) rebuild with one evaluation of each subnet, a
few samples at a time where that is exact (:mod:`.sample_chunks`).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ._state import RngState, captured_rng_state, replay_forward_rng, replayed_rng_state
from .block import InvertibleModule, LogDet, Tensors, Writable, _accepts, _leaf
from .foreign_couplings import Coupling, coupling_for
from .sample_chunks import rebuild_chunks, reconstruct_in_chunks, treats_samples_alone
from .subnets import Refused, SubnetRng, forward_keeping_subnet_rng, reconstruct_with_recorded_subnets

__all__ = ["wrap", "freia_blocks", "FrEIAAdapter", "NormflowsAdapter"]


def _as_logdet(value: Any, batch: int, like: Tensor) -> LogDet:
    """Normalise a foreign log-det (number, 0-d or (N,) tensor) to ``(N,)`` or ``None`` for an exact 0."""
    if value is None:
        return None
    if isinstance(value, numbers.Number):
        return None if value == 0 else like.new_full((batch,), float(value))
    if value.dim() == 0:
        return value.expand(batch)
    return value.reshape(batch, -1).sum(dim=1) if value.dim() > 1 else value


class FrEIAAdapter(InvertibleModule):
    """Run a FrEIA-convention block (``rev=`` / ``jac=`` flags, list in, list out).

    Args:
        module: the FrEIA block.
        inputs: how many leading levels are the block's inputs (``None``: every level that is
            not a condition).
        conditions: indices of the levels handed to the block as its conditions ``c``; they and
            any other levels after the inputs pass through unchanged.
        coupling: where its subnets are, for the coupling-aware rebuild (``None``: generic).

    Attributes:
        rebuild_samples: samples the coupling-aware backward rebuilds at a time where the block
            and its subnets treat each sample alone (NOTE [samples alone] in
            :mod:`.sample_chunks`); ``None``: chosen from the size.
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Optional[int] = None,
        conditions: Sequence[int] = (),
        coupling: Optional[Coupling] = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.inputs = inputs
        self.conditions = tuple(conditions)
        self.coupling = coupling
        self.rebuild_samples: Optional[int] = None
        self._fwd_subnet_rng: "OrderedDict[int, Tuple[RngState, SubnetRng]]" = OrderedDict()

    def _transformed(self, xs: Tensors) -> List[int]:
        count = len(xs) if self.inputs is None else self.inputs
        return [i for i in range(count) if i not in self.conditions]

    def _passed_through(self, xs: Tensors) -> List[int]:
        transformed = self._transformed(xs)
        return [i for i in range(len(xs)) if i not in transformed]

    def _call(self, xs: Tensors, rev: bool) -> Tuple[Tensors, LogDet]:
        transformed = self._transformed(xs)
        extra = {"c": [xs[i] for i in self.conditions]} if self.conditions else {}
        outputs, log_jac_det = self.module([xs[i] for i in transformed], rev=rev, jac=True, **extra)
        ys = list(xs)  # conditions and levels beyond the inputs pass through as the same tensors
        for i, y in zip(transformed, outputs):
            ys[i] = y
        return tuple(ys), _as_logdet(log_jac_det, xs[0].shape[0], outputs[0])

    def _forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        return self._call(xs, rev=False)

    def forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        return _coupling_forward(self, xs)

    def inverse(self, ys: Tensors) -> Tuple[Tensors, LogDet]:
        return self._call(ys, rev=True)

    def reconstruct(self, ys: Tensors, writable: Optional[Writable] = None) -> Tuple[Tensors, Tensors, LogDet]:
        return _coupling_reconstruct(self, ys, writable)


class NormflowsAdapter(InvertibleModule):
    """Run a normflows / memcnn-convention block (``forward`` / ``inverse`` on one tensor).

    Args:
        module: the block.
        coupling: where its subnets are, for the coupling-aware rebuild (``None``: generic).

    Attributes:
        rebuild_samples: as :class:`FrEIAAdapter`'s.
    """

    def __init__(self, module: nn.Module, coupling: Optional[Coupling] = None) -> None:
        super().__init__()
        self.module = module
        self.coupling = coupling
        self.rebuild_samples: Optional[int] = None
        self._fwd_subnet_rng: "OrderedDict[int, Tuple[RngState, SubnetRng]]" = OrderedDict()

    def _passed_through(self, xs: Tensors) -> List[int]:
        return []

    @staticmethod
    def _unpack(result: Any, x: Tensor) -> Tuple[Tensors, LogDet]:
        if isinstance(result, Tensor):
            return (result,), None
        z, log_det = result
        return (z,), _as_logdet(log_det, x.shape[0], z)

    def _single(self, xs: Tensors, direction: str) -> Tensor:
        if len(xs) != 1:
            raise TypeError(
                f"{type(self.module).__name__} follows the normflows / memcnn convention and takes one tensor, "
                f"but {direction}() got {len(xs)}; give InvertibleSequential a single tensor."
            )
        return xs[0]

    def _forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        x = self._single(xs, "forward")
        return self._unpack(self.module(x), x)

    def forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        return _coupling_forward(self, xs)

    def inverse(self, ys: Tensors) -> Tuple[Tensors, LogDet]:
        y = self._single(ys, "inverse")
        return self._unpack(self.module.inverse(y), y)

    def reconstruct(self, ys: Tensors, writable: Optional[Writable] = None) -> Tuple[Tensors, Tensors, LogDet]:
        return _coupling_reconstruct(self, ys, writable)


_KEPT_FORWARDS = 8  # forwards whose subnet RNG states wait for a backward (others: a forward without backward)


def _coupling_forward(adapter: Any, xs: Tensors) -> Tuple[Tensors, LogDet]:
    """The block's forward; in invertible forward, for a coupling with several subnets that draw random numbers,
    the RNG state each subnet call started from is kept for its rebuild, under the engine's state captured before
    the block (NOTE [recorded subnets], NOTE [the block's RNG state, named] in ._state)."""
    coupling: Optional[Coupling] = adapter.coupling
    start = captured_rng_state()
    if coupling is None or len(coupling.subnets) < 2 or start is None:
        return adapter._forward(xs)
    try:
        result, kept = forward_keeping_subnet_rng(adapter.module, coupling.subnets, adapter._forward, xs)
    except Refused:  # raised before any call: a subnet path no longer names a module of its own
        return adapter._forward(xs)
    if kept is not None:
        store = adapter._fwd_subnet_rng
        store[id(start)] = (start, kept)  # the state itself is kept with them: its id stays its own
        while len(store) > _KEPT_FORWARDS:
            store.popitem(last=False)
    return result


def _coupling_reconstruct(adapter: Any, ys: Tensors, writable: Optional[Writable]) -> Tuple[Tensors, Tensors, LogDet]:
    """One evaluation of each subnet when the block is a known coupling (:mod:`.subnets`), a few samples at a
    time where that is exact (:mod:`.sample_chunks`), else the generic recipe."""
    coupling: Optional[Coupling] = adapter.coupling
    if coupling is None:
        return InvertibleModule.reconstruct(adapter, ys)
    chunks = _chunks(adapter, coupling, ys)
    if chunks is None:
        return _rebuild(adapter, coupling, ys, writable)
    return reconstruct_in_chunks(
        adapter, lambda ys_chunk: _rebuild(adapter, coupling, ys_chunk, None), ys, adapter._passed_through(ys),
        chunks, writable,
    )


def _chunks(adapter: Any, coupling: Coupling, ys: Tensors) -> Optional[List[slice]]:
    """The chunks of samples to rebuild at a time, where the block and its subnets treat each sample alone
    (NOTE [samples alone] in :mod:`.sample_chunks`); ``None``: the whole batch."""
    samples = adapter.rebuild_samples
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(
            f"{type(adapter).__name__}.rebuild_samples must be a positive int or None, got {samples!r}."
        )
    module = adapter.module
    if not coupling.per_sample(module) or not all(treats_samples_alone(module.get_submodule(p)) for p in coupling.subnets):
        return None
    # A block without a trainable parameter has no local backward when its input needs no gradient (the
    # first block of a frozen stem): the chunks would never run, so it is rebuilt at once.
    if not any(p.requires_grad for p in adapter.parameters()):
        return None
    return rebuild_chunks(ys, samples)


def _rebuild(adapter: Any, coupling: Coupling, ys: Tensors, writable: Optional[Writable]) -> Tuple[Tensors, Tensors, LogDet]:
    """The coupling-aware rebuild of ``ys``; a refused call is redone by the generic recipe from the same RNG
    state, so gradients are the same."""
    start = replayed_rng_state()  # the state captured before this block's forward, replayed for its rebuild
    stored = adapter._fwd_subnet_rng.pop(id(start), None) if start is not None and adapter._fwd_subnet_rng else None
    kept = stored[1] if stored is not None and stored[0] is start else None
    try:
        return reconstruct_with_recorded_subnets(
            adapter.module, coupling.subnets, adapter.inverse, adapter._forward, ys,
            clone_outputs=coupling.changes_subnet_outputs_in_place, fwd_rng=kept,
            writable_outputs=writable.outputs if writable is not None else (),
        )
    except Refused as refused:
        if refused.xs is None:
            return InvertibleModule.reconstruct(adapter, ys)
        leaves = tuple(_leaf(x) for x in refused.xs)  # the inverse's result: the second half of the recipe
        with replay_forward_rng():  # NOTE [one RNG replay per evaluation]
            ys_local, logdet_local = adapter._forward(leaves)
        return leaves, tuple(ys_local), logdet_local


def wrap(module: nn.Module, *, where: str = "wrap") -> InvertibleModule:
    """Make ``module`` an :class:`InvertibleModule`, adapting foreign conventions.

    Args:
        module: an :class:`InvertibleModule` (returned as is), a FrEIA-style
            block (``forward(xs, c=[], rev=False, jac=True)``; one built with
            conditions takes them as the levels after its inputs) or a normflows /
            memcnn-style block (``forward(z)`` and ``inverse(z)``). A coupling of a
            class in :data:`~.foreign_couplings.COUPLING_CLASSES` or registered with
            :func:`~.foreign_couplings.register_coupling` rebuilds coupling-aware.
        where: prefix of error messages (the caller's position).

    Raises:
        TypeError: when ``module`` is no module or has no way to invert itself.

    Example:
        >>> from torch import nn
        >>> class Scale(nn.Module):  # normflows / memcnn convention
        ...     def forward(self, z): return 2 * z
        ...     def inverse(self, z): return z / 2
        >>> type(wrap(Scale())).__name__
        'NormflowsAdapter'
    """
    if isinstance(module, InvertibleModule):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(module).__name__}.")
    if _accepts(module.forward, "rev", "jac"):
        dims_c = list(getattr(module, "dims_c", None) or [])
        inputs = len(module.dims_in) if dims_c and isinstance(getattr(module, "dims_in", None), list) else None
        conditions = tuple(range(inputs, inputs + len(dims_c))) if inputs is not None else ()
        return FrEIAAdapter(module, inputs, conditions, coupling_for(module))
    if callable(getattr(module, "inverse", None)):
        return NormflowsAdapter(module, coupling_for(module))
    raise TypeError(
        f"{where} ({type(module).__name__}) has no inverse: give it an inverse(y) method, subclass "
        "pyramidflow.InvertibleModule, or use the FrEIA convention forward(xs, rev=False, jac=True)."
    )


def freia_blocks(inn: nn.Module) -> List[InvertibleModule]:
    """The blocks of a FrEIA ``SequenceINN``, adapted, for :class:`InvertibleSequential`.

    The sequence's levels are ``(x, c_0, c_1, ...)``: the data and the INN's conditions in the
    order of its ``c`` list; each block is handed the condition its ``append(..., cond=i)`` named,
    and every block passes the conditions through.

    Args:
        inn: a ``FrEIA.framework.SequenceINN``.

    Raises:
        TypeError: ``inn`` has no ``module_list`` and ``conditions`` (not a ``SequenceINN``).

    Example:
        >>> import torch
        >>> import FrEIA.framework as Ff, FrEIA.modules as Fm  # doctest: +SKIP
        >>> inn = Ff.SequenceINN(4, 8, 8)  # doctest: +SKIP
        >>> inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(2, 8, 8), subnet_constructor=net)  # doctest: +SKIP
        >>> flow = InvertibleSequential(*freia_blocks(inn))  # doctest: +SKIP
        >>> (z, c), logdet = flow((x, c))  # doctest: +SKIP
    """
    modules, conditions = getattr(inn, "module_list", None), getattr(inn, "conditions", None)
    if modules is None or conditions is None or len(modules) != len(conditions):
        raise TypeError(
            f"freia_blocks: expected a FrEIA SequenceINN (module_list and conditions), got {type(inn).__name__}; "
            "give other blocks to InvertibleSequential directly."
        )
    blocks: List[InvertibleModule] = []
    for i, (module, cond) in enumerate(zip(modules, conditions)):
        where = f"freia_blocks: block {i}"
        if not _accepts(module.forward, "rev", "jac"):
            raise TypeError(f"{where} ({type(module).__name__}) does not take rev= and jac=; it is not a FrEIA block.")
        blocks.append(FrEIAAdapter(module, 1, () if cond is None else (1 + cond,), coupling_for(module)))
    return blocks
