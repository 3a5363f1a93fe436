"""The block contract of the invertible engine.

A block maps a tuple of tensors to a tuple of tensors (a pyramid is a tuple of
levels of different shapes; a plain flow is a 1-tuple) and can undo itself.
Each direction also returns the block's log-determinant per sample, or ``None``
when the block preserves volume, so that no log-det tensor is carried at all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ._state import replay_forward_rng

Tensors = Tuple[Tensor, ...]
LogDet = Optional[Tensor]

__all__ = ["InvertibleModule", "Tensors", "LogDet", "Writable", "add_optional"]


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

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.reconstruct_takes_writable = _accepts(cls.reconstruct, "writable")

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


def add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """Sum two optional tensors (log-determinants, gradients) where ``None`` stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b
