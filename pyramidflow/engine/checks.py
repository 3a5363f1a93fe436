"""Checks for users debugging their blocks, and for the engine's debug mode.

Every check here syncs the device (it reads a value back): none of them runs
in the engine's hot loop unless ``debug=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._state import RngState, recomputation
from .adapters import wrap
from .block import InvertibleModule, LogDet, Tensors
from .errors import InvertibleError

__all__ = ["BlockReport", "check_inverse", "reconstruction_error", "captured_grad_tensors"]


@dataclass(frozen=True)
class BlockReport:
    """How well one block inverts itself.

    Attributes:
        index: position of the block in the sequence.
        name: class name of the block.
        error: relative reconstruction error ``|inverse(forward(x)) - x| / |x|`` over all tensors.
        logdet_error: largest ``|logdet_forward + logdet_inverse|`` over the batch (0 without log-dets).
    """

    index: int
    name: str
    error: float
    logdet_error: float


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
) -> List[BlockReport]:
    """Report, block by block, how exactly each block's inverse undoes its forward.

    Runs the blocks in sequence on ``inputs`` without a graph; for each block
    compares ``inverse(forward(x))`` with ``x`` and the two log-determinants.
    Running statistics are left as they were.

    Args:
        blocks: an :class:`InvertibleSequential` or an iterable of blocks.
        inputs: the first block's input, a tensor or a tuple of tensors.

    Returns:
        One :class:`BlockReport` per block, in order.

    Example:
        >>> import torch
        >>> from pyramidflow import InvertibleSequential, check_inverse
        >>> from pyramidflow.engine.coupling import AffineCoupling
        >>> seq = InvertibleSequential(AffineCoupling(4, 8), AffineCoupling(4, 8, parity=1))
        >>> [r.error < 1e-6 for r in check_inverse(seq, torch.randn(2, 4, 8, 8))]
        [True, True]
    """
    block_list = list(getattr(blocks, "blocks", blocks))
    xs: Tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    reports = []
    for index, block in enumerate(block_list):
        block = wrap(block, where=f"check_inverse: block {index}")
        report = _round_trip(block, xs)
        reports.append(BlockReport(index, report.name, report.error, report.logdet_error))
        with torch.no_grad(), recomputation(block):
            xs = tuple(block(xs)[0])
    return reports


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
