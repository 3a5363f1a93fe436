"""Checks for users debugging their blocks, for the engine's debug mode, and of the block contract.

Every check here but :func:`check_block_result` and :func:`contract_checks` syncs the device (it
reads a value back): none of those runs in the engine's hot loop unless ``debug=True``. The contract
checks compare structure and shapes only (NOTE [contract checks]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._state import RngState, recomputation
from .adapters import wrap
from .block import InvertibleModule, LogDet, Tensors
from .errors import InvertibleError

__all__ = [
    "BlockReport", "InverseCheck", "check_inverse", "reconstruction_error", "captured_grad_tensors", "check_block_result",
    "contract_checks",
]


@dataclass(frozen=True)
class BlockReport:
    """How well one block inverts itself.

    Attributes:
        index: position of the block in the sequence.
        name: class name of the block.
        error: relative reconstruction error ``|inverse(forward(x)) - x| / |x|`` over all tensors.
        logdet_error: largest ``|logdet_forward + logdet_inverse|`` over the batch (0 without log-dets).
        chain_error: relative error of this block's input rebuilt from the *last* block's output by
            inverting every block after it, as invertible backward rebuilds it: where compounding shows.
    """

    index: int
    name: str
    error: float
    logdet_error: float
    chain_error: float = float("nan")


class InverseCheck(list):
    """The result of :func:`check_inverse`: a list of :class:`BlockReport`, one per block, plus the whole chain.

    Indexes and iterates as a list of per-block reports, so code that reads it as a list keeps working.

    Attributes:
        end_to_end: relative error of the whole chain's round trip, ``inverse(forward(x))``
            against ``x`` (the first block's ``chain_error``). A chain of blocks that each
            invert to 1e-6 may still lose every digit here when errors compound.
    """

    @property
    def end_to_end(self) -> float:
        return self[0].chain_error if self else 0.0


def reconstruction_error(xs: Sequence[Tensor], xs_rebuilt: Sequence[Tensor]) -> float:
    """Relative L2 error between two tuples of tensors, computed in float64."""
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(xs, xs_rebuilt))
    den = sum(float(a.double().square().sum()) for a in xs)
    return (num / max(den, 1e-300)) ** 0.5


def _round_trip(block: InvertibleModule, xs: Tensors) -> BlockReport:
    """Forward then inverse of one block, same RNG draws, buffers left as they were."""
    rng = RngState.capture(xs)
    with torch.no_grad(), recomputation(block):
        with rng.replay():
            ys, logdet = block(xs)
        with rng.replay():
            xs_rebuilt, logdet_inverse = block.inverse(tuple(ys))
    error = reconstruction_error(xs, tuple(xs_rebuilt))
    logdet_error = 0.0
    if logdet is not None or logdet_inverse is not None:
        fwd = logdet if logdet is not None else 0.0
        inv = logdet_inverse if logdet_inverse is not None else 0.0
        logdet_error = float(torch.as_tensor(fwd + inv).abs().max())
    return BlockReport(-1, type(block).__name__, error, logdet_error)


def check_inverse(
    blocks: Union[nn.Module, Iterable[nn.Module]],
    inputs: Union[Tensor, Sequence[Tensor]],
) -> InverseCheck:
    """Report, block by block and for the whole chain, how exactly the inverses undo the forwards.

    Runs the blocks in sequence on ``inputs`` without a graph; for each block
    compares ``inverse(forward(x))`` with ``x`` and the two log-determinants.
    Then inverts the whole chain from the last output, block by block (what
    invertible backward does) and compares every rebuilt input with the true
    one (``chain_error``; the first block's is ``end_to_end``). Each block sees
    the RNG draws of its forward in both directions; running statistics (also
    lazily sized ones) are left as they were.

    Args:
        blocks: an :class:`InvertibleSequential` or an iterable of blocks.
        inputs: the first block's input, a tensor or a tuple of tensors.

    Returns:
        An :class:`InverseCheck`: one :class:`BlockReport` per block, in order, and ``end_to_end``.

    Example:
        >>> import torch
        >>> from pyramidflow import InvertibleSequential, check_inverse
        >>> from pyramidflow.engine.coupling import AffineCoupling
        >>> seq = InvertibleSequential(AffineCoupling(4, 8), AffineCoupling(4, 8, parity=1))
        >>> report = check_inverse(seq, torch.randn(2, 4, 8, 8))
        >>> [r.error < 1e-6 for r in report], report.end_to_end < 1e-6
        ([True, True], True)
    """
    block_list = [wrap(block, where=f"check_inverse: block {i}") for i, block in enumerate(getattr(blocks, "blocks", blocks))]
    xs: Tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    reports, states, rngs = [], [], []
    for index, block in enumerate(block_list):
        rng = RngState.capture(xs)
        report = _round_trip(block, xs)
        reports.append(report)
        states.append(xs)
        rngs.append(rng)
        with torch.no_grad(), recomputation(block), rng.replay():
            xs = tuple(block(xs)[0])
    chain_errors = [0.0] * len(block_list)
    for index in range(len(block_list) - 1, -1, -1):  # NOTE [drift monitoring]: what backward rebuilds
        with torch.no_grad(), recomputation(block_list[index]), rngs[index].replay():
            xs = tuple(block_list[index].inverse(xs)[0])
        chain_errors[index] = reconstruction_error(states[index], xs)
    return InverseCheck(
        BlockReport(i, r.name, r.error, r.logdet_error, chain_errors[i]) for i, r in enumerate(reports)
    )


def check_reconstruction(block: InvertibleModule, xs: Tensors, tolerance: float, *, where: str) -> None:
    """Raise when ``block`` does not reconstruct ``xs`` to ``tolerance`` (debug mode)."""
    report = _round_trip(block, tuple(x.detach() for x in xs))
    if not report.error <= tolerance:
        raise InvertibleError(
            f"{where}: inverse(forward(x)) differs from x by a relative error of {report.error:.3g} "
            f"(tolerance {tolerance:g}); check the block's inverse, clamp its scales, or run it in float64."
        )


def check_finite(ys: Tensors, logdet: LogDet, *, where: str) -> None:
    """Raise when a block produced NaN or infinity (debug mode)."""
    for i, y in enumerate(tuple(ys) + ((logdet,) if logdet is not None else ())):
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            what = "log-determinant" if i == len(ys) else f"output {i}"
            raise InvertibleError(f"{where}: {what} holds NaN or infinity; lower the learning rate or clamp the scales.")


def captured_grad_tensors(block: nn.Module) -> Optional[str]:
    """Name of a tensor attribute that requires grad but is not a parameter, if ``block`` holds one.

    Invertible mode passes gradients to inputs and parameters only; such a
    tensor would silently get none.
    """
    for module_name, module in block.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) and value.requires_grad:
                return f"{module_name}.{name}" if module_name else name
    return None


# NOTE [contract checks]
# A block that breaks the contract (InvertibleModule's docstring) otherwise shows up as a raw torch
# error in a later block, or not at all: AffineCoupling(4, ...) given 3 channels returned 4, and a
# (N, 1) log-det broadcasts against the (N,) sum into an (N, N) one. The check reads shapes only
# (no value, so no device sync): the result is a pair (ys, logdet); ys a non-empty tuple of tensors,
# batch first, with as many elements in all as the block took (a bijection keeps the dimension);
# logdet None or of shape (N,). InvertibleSequential runs it on every block (forward hooks, removed
# afterwards) the first time it sees an input signature, in every mode; later calls with the same
# shapes cost one signature lookup. Under torch.compile and torch.export nothing is checked: comparing
# symbolic shapes would pin them (an ONNX graph with a dynamic batch would lose it).


def _shapes(tensors: Sequence[Any]) -> str:
    return ", ".join(str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__ for t in tensors)


def check_block_result(result: Any, xs: Sequence[Tensor], *, where: str) -> None:
    """Raise when one block's ``forward(xs)`` result breaks the contract (NOTE [contract checks]).

    Raises:
        TypeError: not ``(ys, logdet)`` with ``ys`` a non-empty tuple of tensors.
        ValueError: ``ys`` with another element count or batch size than ``xs``; ``logdet`` not ``(N,)``.
    """
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(
            f"{where}: forward() returned {type(result).__name__}; it must return (ys, logdet), ys a tuple of "
            "tensors and logdet a tensor of shape (N,) or None."
        )
    ys, logdet = result
    if not (isinstance(ys, (tuple, list)) and ys and all(isinstance(y, Tensor) for y in ys)):
        raise TypeError(
            f"{where}: forward() returned ys of type {type(ys).__name__}; ys must be a non-empty tuple of tensors."
        )
    batch = xs[0].shape[0]
    taken, given = sum(x.numel() for x in xs), sum(y.numel() for y in ys)
    if given != taken or any(y.dim() == 0 or y.shape[0] != batch for y in ys):
        raise ValueError(
            f"{where}: forward() took shapes {_shapes(xs)} ({taken} elements) but returned {_shapes(ys)} ({given}); "
            "an invertible block returns as many elements as it takes, batch first: check the block's channel "
            "count against its input."
        )
    if logdet is not None and (not isinstance(logdet, Tensor) or tuple(logdet.shape) != (batch,)):
        shape = tuple(logdet.shape) if isinstance(logdet, Tensor) else type(logdet).__name__
        raise ValueError(
            f"{where}: forward() returned a log-determinant of shape {shape}; it must be a tensor of shape "
            f"({batch},), one value per sample (sum over the other dimensions), or None for a volume-preserving block."
        )


@contextlib.contextmanager
def contract_checks(blocks: Sequence[nn.Module], where: Callable[[int], str]) -> Iterator[None]:
    """Check the result of every call of each block while open (NOTE [contract checks]); ``where(i)`` names block i."""
    handles = []
    for index, block in enumerate(blocks):
        def hook(module: nn.Module, args: tuple, result: Any, index: int = index) -> None:
            check_block_result(result, args[0], where=where(index))

        handles.append(block.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
