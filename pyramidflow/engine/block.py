"""The block contract of the invertible engine.

A block maps a tuple of tensors to a tuple of tensors (a pyramid is a tuple of
levels of different shapes; a plain flow is a 1-tuple) and can undo itself.
Each direction also returns the block's log-determinant per sample, or ``None``
when the block preserves volume, so that no log-det tensor is carried at all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._state import calling, replay_forward_rng

Tensors = Tuple[Tensor, ...]
LogDet = Optional[Tensor]

__all__ = [
    "CallContext", "InvertibleModule", "Tensors", "LogDet", "Writable", "add_optional", "call_forward",
    "call_reconstruct", "tracing",
]


def tracing() -> bool:
    """``torch.jit.trace``, ``torch.export`` (ONNX) or ``torch.compile`` is recording this call."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


@dataclass(frozen=True)
class CallContext:
    """How the engine calls a block: handed to a ``forward`` or ``reconstruct`` that takes ``context=``.

    The block chooses its path once, at the top of the call, from this instead of from global state
    (NOTE [call context] in :mod:`._state`).

    Attributes:
        grad: a graph is recorded for the call's outputs (``torch.is_grad_enabled()`` when it was made).
        rebuild: the call is invertible backward's rebuild of this block: its graph serves one local
            backward and its outputs' values are never read, so a leaner graph whose backward is exact
            will do (NOTE [rebuilding in backward] in :mod:`._state`). Always ``True`` for ``reconstruct``.
        overwritable: per input level, whether ``forward`` may write its output over that level, which
            no one else reads (NOTE [forward in place] in :mod:`._state`); ``()``: none. Always ``()`` for
            ``reconstruct``, whose :class:`Writable` says what it may overwrite.
        tracing: ``torch.jit.trace``, ``torch.export`` or ``torch.compile`` records the call: a path that
            loops over samples or tiles, or writes into given tensors, would be recorded wrong.
    """

    grad: bool
    rebuild: bool = False
    overwritable: Tuple[bool, ...] = ()
    tracing: bool = False

    @classmethod
    def now(cls, rebuild: bool = False, overwritable: Sequence[bool] = ()) -> "CallContext":
        """The context of a call made now: ``grad`` and ``tracing`` as torch has them, the rest as given.

        What a block called by hand (not by the engine, or by a block that does not pass its own
        context on) takes when it gets ``context=None``: no rebuild, nothing overwritable.
        """
        return cls(torch.is_grad_enabled(), rebuild, tuple(overwritable), tracing())

    def may_overwrite(self, level: int) -> bool:
        """Whether ``forward`` may write its output over input level ``level`` (never with a graph)."""
        return not self.grad and level < len(self.overwritable) and self.overwritable[level]


@dataclass(frozen=True)
class Writable:
    """What a block's :meth:`~InvertibleModule.reconstruct` may overwrite, per level of its outputs.

    The engine sets these only where no one else can read the tensor (NOTE [writing in
    place in backward] in :mod:`.ownership`).

    Attributes:
        outputs: the storage of output level ``j`` may be reused (e.g. for the rebuilt input).
        gradients: the gradient that the local backward receives for output level ``j`` may be
            overwritten (e.g. with the input's gradient).
        rebuild_first: the rebuilt inputs must hold their values when ``reconstruct`` returns,
            before the local backward: the engine checks their drift then, so that under
            ``drift="recompute"`` it may still let the block overwrite gradients. Asked only of
            blocks that say they can (``rebuilds_before_backward = True``).
    """

    outputs: Tuple[bool, ...]
    gradients: Tuple[bool, ...]
    rebuild_first: bool = False


class InvertibleModule(nn.Module):
    """Base class of every block run by :class:`InvertibleSequential`.

    Note to implementers:
        MUST hold:

        * ``forward(xs) -> (ys, logdet)`` and ``inverse(ys) -> (xs, logdet)``
          take and return tuples of tensors with the same structure (the
          ``ys`` of ``forward`` have the count and shapes that ``inverse``
          takes, and the other way round).
        * ``logdet`` is a tensor of shape ``(N,)`` (one value per sample) or
          ``None`` for a volume-preserving block; the ``logdet`` of
          ``inverse`` is minus that of ``forward``.
        * ``inverse(forward(xs)[0])[0]`` is close to ``xs`` (check it with
          :func:`pyramidflow.check_inverse`).
        * Neither direction changes its inputs in place.

        MAY be provided:

        * :meth:`reconstruct`, a fused reconstruct-and-backward path. The
          default runs ``inverse`` without grad and then ``forward`` with grad,
          which evaluates any inner network twice. A coupling knows that its
          conditioning input passes through unchanged, so one grad-enabled
          evaluation of its network gives both the input and the local graph;
          see :class:`pyramidflow.engine.coupling.AffineCoupling`.
        * ``reconstruct(ys, writable=None)`` taking a :class:`Writable`: the
          engine then says which output storages and incoming gradients the
          block may overwrite, so that it can rebuild its input and its
          input's gradient without new memory. The keyword in the signature
          is the declaration (read once, when the class is defined, into
          :attr:`reconstruct_takes_writable`); a ``reconstruct(ys)`` is called
          without it.
        * ``forward(xs, context=None)`` and ``reconstruct(ys, context=None)``
          taking a :class:`CallContext`: the engine then says how it calls the
          block (a graph or not, backward's rebuild, which input levels
          ``forward`` may write over, a tracer recording), so that the block
          chooses its path once per call. Declared the same way
          (:attr:`forward_takes_context`, :attr:`reconstruct_takes_context`);
          a block without the keyword is called without it. ``None`` means a
          call by hand: take :meth:`CallContext.now`.

        Buffers changed in ``forward`` (running statistics) are restored by
        the engine after every recomputation, so they change once per step.
        Randomness is replayed: the engine restores the RNG state the block saw
        in forward before it reconstructs the block. A ``reconstruct`` that
        evaluates random parts (dropout) more than once, as the default does
        (``inverse``, then ``forward``), wraps each evaluation in
        :func:`pyramidflow.engine.replay_forward_rng` so that each draws what
        forward drew.
    """

    #: ``True`` when every call returns ``logdet=None``; lets the engine skip
    #: log-det bookkeeping. Informational only: ``None`` at run time is what counts.
    volume_preserving: bool = False

    #: ``True`` when ``reconstruct(ys, writable=Writable(..., rebuild_first=True))`` returns inputs that
    #: already hold their values (see :class:`Writable`); lets ``drift="recompute"`` overwrite gradients.
    #: Needs :attr:`reconstruct_takes_writable`.
    rebuilds_before_backward: bool = False

    #: ``True`` when :meth:`reconstruct` takes ``writable=``: the engine passes a :class:`Writable` only
    #: then. Set from the signature when a subclass is defined; not meant to be set by hand.
    reconstruct_takes_writable: bool = False

    #: ``True`` when :meth:`forward` takes ``context=``: the engine passes a :class:`CallContext` only then.
    #: Set from the signature when a subclass is defined; not meant to be set by hand.
    forward_takes_context: bool = False

    #: ``True`` when :meth:`reconstruct` takes ``context=``; as :attr:`forward_takes_context`.
    reconstruct_takes_context: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.reconstruct_takes_writable = _accepts(cls.reconstruct, "writable")
        cls.forward_takes_context = _accepts(cls.forward, "context")
        cls.reconstruct_takes_context = _accepts(cls.reconstruct, "context")

    def forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(xs) -> (ys, logdet).")

    def inverse(self, ys: Tensors) -> Tuple[Tensors, LogDet]:  # pragma: no cover - abstract
        raise NotImplementedError(
            f"{type(self).__name__} has no inverse(ys); an InvertibleSequential block must implement "
            "inverse(ys) -> (xs, logdet)."
        )

    def reconstruct(self, ys: Tensors) -> Tuple[Tensors, Tensors, LogDet]:
        """Rebuild this block's inputs from its outputs, with a local graph for backward.

        Called by the engine in backward, with grad enabled, on detached
        ``ys``. The engine then backpropagates the upstream gradient through
        ``ys_local`` (and ``logdet_local``) into ``xs`` and this block's
        parameters, and only after that reads ``xs`` as the outputs of the
        previous block. A fused implementation may therefore fill ``xs``
        during that local backward (a fused kernel does).

        Args:
            ys: this block's outputs, detached.

        Returns:
            ``(xs, ys_local, logdet_local)``: the inputs as leaves that
            require grad (floating tensors only), the outputs as a
            differentiable function of ``xs`` and the parameters, and the
            log-determinant recomputed the same way (or ``None``). The engine
            only backpropagates through ``ys_local`` and never reads their
            values, so a fused path may return placeholders of the right shape
            whose backward is exact (NOTE [placeholder outputs] in
            :mod:`pyramidflow.model.coupling_regions`).
        """
        with torch.no_grad(), replay_forward_rng():  # NOTE [one RNG replay per evaluation]
            xs, _ = self.inverse(ys)
        xs = tuple(_leaf(x) for x in xs)
        with replay_forward_rng():
            ys_local, logdet_local = self.forward(xs)
        return xs, tuple(ys_local), logdet_local


def call_forward(block: InvertibleModule, xs: Tensors, context: CallContext) -> Any:
    """The engine's call of ``block``'s forward: ``block(xs, context=context)`` where the block takes it, else
    ``block(xs)``; the context also answers :func:`~._state.is_rebuilding` and :func:`~._state.may_overwrite`
    during the call (NOTE [call context] in :mod:`._state`). Returns what the block returns.

    Read from the class: a module that is no :class:`InvertibleModule` (put into a sequence's blocks by
    hand, as the memcnn peer benchmark does) is called without it."""
    with calling(context.rebuild, [x for x, free in zip(xs, context.overwritable) if free]):
        return block(xs, context=context) if getattr(type(block), "forward_takes_context", False) else block(xs)


def call_reconstruct(block: InvertibleModule, ys: Tensors, writable: Optional[Writable] = None) -> Tuple[Tensors, Tensors, LogDet]:
    """The engine's call of ``block``'s reconstruct, with ``writable=`` and ``context=`` where the block takes
    them (its declared capabilities)."""
    kwargs: dict = {}
    if writable is not None and getattr(type(block), "reconstruct_takes_writable", False):
        kwargs["writable"] = writable
    if getattr(type(block), "reconstruct_takes_context", False):
        kwargs["context"] = CallContext.now(rebuild=True)
    return block.reconstruct(ys, **kwargs)


def _accepts(fn: Callable, *names: str) -> bool:
    """Whether ``fn`` takes every parameter in ``names`` (a callable without a signature: no)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in names)


def _leaf(x: Tensor) -> Tensor:
    """A detached copy-free leaf of ``x`` that requires grad when ``x`` is floating."""
    x = x.detach()
    if x.is_floating_point() or x.is_complex():
        x.requires_grad_(True)
    return x


def gradients_used(ctx: Any, first: int) -> List[bool]:
    """Per input of a custom autograd Function from the ``first``-th on (all tensors), whether the backward under
    way uses its gradient: one it needs whose next node the engine will run (``torch.autograd.grad`` with a
    narrower ``inputs`` skips the others)."""
    used = []
    for need, (node, _) in zip(ctx.needs_input_grad[first:], ctx.next_functions):
        try:
            used.append(bool(need) and node is not None and torch._C._will_engine_execute_node(node))
        except (AttributeError, RuntimeError):  # no such query in this torch, or outside the engine: assume used
            used.append(bool(need))
    return used


def add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """Sum two optional tensors (log-determinants, gradients) where ``None`` stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b
