"""Adapters: blocks written for other flow libraries, run unchanged by the engine.

Two foreign conventions are recognised:

* FrEIA (also anomalib's FastFlow, CFlow, CS-Flow, U-Flow blocks):
  ``module(xs: list, c=[], rev=False, jac=True) -> (outputs, log_jac_det)``.
* normflows / memcnn: ``forward(z)`` and ``inverse(z)`` on one tensor, each
  returning ``(z, log_det)`` or just a tensor (then the block preserves volume).

Neither library is a dependency: detection looks at the call signature.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Tuple

from torch import Tensor, nn

from .block import InvertibleModule, LogDet, Tensors

__all__ = ["wrap", "FrEIAAdapter", "NormflowsAdapter"]


def _accepts(fn: Any, *names: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in names)


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
    """Run a FrEIA-convention block (``rev=`` / ``jac=`` flags, list in, list out)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def _call(self, xs: Tensors, rev: bool) -> Tuple[Tensors, LogDet]:
        outputs, log_jac_det = self.module(list(xs), rev=rev, jac=True)
        outputs = tuple(outputs)
        return outputs, _as_logdet(log_jac_det, xs[0].shape[0], outputs[0])

    def forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        return self._call(xs, rev=False)

    def inverse(self, ys: Tensors) -> Tuple[Tensors, LogDet]:
        return self._call(ys, rev=True)


class NormflowsAdapter(InvertibleModule):
    """Run a normflows / memcnn-convention block (``forward`` / ``inverse`` on one tensor)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

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

    def forward(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        x = self._single(xs, "forward")
        return self._unpack(self.module(x), x)

    def inverse(self, ys: Tensors) -> Tuple[Tensors, LogDet]:
        y = self._single(ys, "inverse")
        return self._unpack(self.module.inverse(y), y)


def wrap(module: nn.Module, *, where: str = "wrap") -> InvertibleModule:
    """Make ``module`` an :class:`InvertibleModule`, adapting foreign conventions.

    Args:
        module: an :class:`InvertibleModule` (returned as is), a FrEIA-style
            block (``forward(xs, c=[], rev=False, jac=True)``) or a normflows /
            memcnn-style block (``forward(z)`` and ``inverse(z)``).
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
        return FrEIAAdapter(module)
    if callable(getattr(module, "inverse", None)):
        return NormflowsAdapter(module)
    raise TypeError(
        f"{where} ({type(module).__name__}) has no inverse: give it an inverse(y) method, subclass "
        "pyramidflow.InvertibleModule, or use the FrEIA convention forward(xs, rev=False, jac=True)."
    )
