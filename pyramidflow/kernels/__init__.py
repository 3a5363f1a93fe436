"""Kernel ops of pyramidflow, installed as ``pyramidflow.kernels``.

Each public op dispatches to a Triton kernel (:mod:`.triton`) when its inputs
are on CUDA and Triton is importable, and to the PyTorch reference in
:mod:`.reference` otherwise. The choice never changes results beyond float tolerance.

Choosing the backend, strongest first:

1. the ``backend=`` keyword of each op: ``"triton"``, ``"reference"`` or
   ``None`` / ``"auto"`` (the default);
2. the environment variable ``PYRAMIDFLOW_KERNELS`` (``reference`` forces the
   reference, ``triton`` the Triton kernels; read at every call, so
   ``os.environ["PYRAMIDFLOW_KERNELS"] = "reference"`` works from code too);
3. ``auto``: Triton for CUDA tensors when triton can be imported, else the reference.

``backend="triton"`` on CPU tensors runs the kernels under Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was first
imported (the tests do this). Importing this package does not import triton.

Example:
    >>> import torch
    >>> from pyramidflow import kernels
    >>> x, r, t = torch.randn(3, 2, 4, 5, 5).unbind(0)
    >>> y, _ = kernels.affine_coupling(x, r, t, volume_norm="CVN", backend="reference")
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .reference import VOLUME_NORMS, log_scale, scale_shift, scale_shift_inverse, soft_clamp

__all__ = [
    "BACKENDS",
    "VOLUME_NORMS",
    "affine_coupling",
    "affine_coupling_bwd",
    "affine_coupling_bwd_into",
    "affine_coupling_into",
    "affine_coupling_inverse",
    "affine_coupling_reconstruct",
    "log_scale",
    "resolve_backend",
    "scale_shift",
    "scale_shift_inverse",
    "soft_clamp",
]

BACKENDS = ("auto", "triton", "reference")
_ENV = "PYRAMIDFLOW_KERNELS"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_module() -> ModuleType:
    """The Triton implementation of the ops, imported on first use (it imports triton)."""
    from .triton import affine_coupling as implementation  # noqa: PLC0415  (lazy: see the module docstring)

    return implementation


def _choice(name: str, value: Optional[str], where: str) -> str:
    choice = "auto" if value is None or value == "" else str(value).strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{where}: {name} must be one of {BACKENDS}, got {value!r}.")
    return choice


def resolve_backend(
    op: str,
    backend: Optional[str],
    *tensors: Optional[Tensor],
    differentiable: bool = True,
    constant: Optional[Tensor] = None,
) -> str:
    """The backend an op call runs on: ``"triton"`` or ``"reference"`` (see the module docstring).

    Args:
        op: the op's name, for messages.
        backend: the op's ``backend=`` keyword.
        tensors: the op's tensor operands (``None`` entries are ignored).
        differentiable: whether the Triton version of the op is differentiable;
            if not, ``auto`` picks the reference when a graph must be recorded.
        constant: an operand the Triton version treats as a constant (the
            ``running_mean``). When it carries a graph (volume normalisation
            synchronized across ranks), ``auto`` picks the reference, which
            passes the gradient through it, and ``"triton"`` is refused.

    Raises:
        ValueError: an unknown backend name (keyword or environment), or
            ``"triton"`` with a ``constant`` that requires grad.
        ModuleNotFoundError: ``"triton"`` was asked for and triton cannot be imported.
    """
    choice = _choice("backend", backend, op)
    if choice == "auto":
        choice = _choice(_ENV, os.environ.get(_ENV), f"{op} (environment variable {_ENV})")
    if choice == "triton" and not _triton_importable():
        raise ModuleNotFoundError(
            f"{op}: backend 'triton' was asked for but triton cannot be imported; install triton or use backend='reference'."
        )
    constant_needs_graph = constant is not None and constant.requires_grad and torch.is_grad_enabled()
    if choice == "triton" and constant_needs_graph:
        raise ValueError(
            f"{op}: the Triton kernels treat running_mean as a constant, but this one requires grad; "
            "use backend='reference' (or 'auto') for a mean with a graph."
        )
    if choice != "auto":
        return choice
    if constant_needs_graph:
        return "reference"
    present = [x for x in tensors if x is not None]
    on_cuda = bool(present) and all(x.is_cuda for x in present)
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in present)
    if on_cuda and _triton_importable() and (differentiable or not needs_graph):
        return "triton"
    return "reference"


def affine_coupling(
    x: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Forward of the coupling's affine transform, ``y = exp(s) * x + t``, differentiable in ``x``, ``r``, ``t``.

    See :func:`.reference.affine_coupling` for the maths and
    :func:`.triton.affine_coupling.affine_coupling` for the kernel (``backend`` as in the module docstring).
    """
    kwargs = dict(volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    if resolve_backend("affine_coupling", backend, x, r, t, running_mean, constant=running_mean) == "triton":
        return _triton_module().affine_coupling(x, r, t, **kwargs)
    return reference.affine_coupling(x, r, t, **kwargs)


def affine_coupling_into(
    x: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    out: Tensor,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
    backend: Optional[str] = None,
    scratch: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """:func:`affine_coupling` without grad, into ``out`` (may be ``x``); returns the detached batch mean.

    The reference works a slice at a time (:func:`.reference.affine_coupling_into`), keeping the clamped
    log-scale in ``scratch`` between its passes where one is given (``r`` itself where the caller no longer
    needs it); the Triton kernel writes straight into ``out`` in one pass
    (:func:`.triton.affine_coupling.affine_coupling_into`) and leaves ``scratch`` alone.
    Neither allocates a tensor of ``out``'s size, so the planner's count on ``meta`` (the reference)
    bounds what a GPU allocates (tests/kernels/test_into.py pins it).
    """
    kwargs = dict(volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    if resolve_backend("affine_coupling_into", backend, x, r, t, out, running_mean, constant=running_mean) == "triton":
        return _triton_module().affine_coupling_into(x, r, t, out=out, **kwargs)
    return reference.affine_coupling_into(x, r, t, out=out, scratch=scratch, **kwargs)


def affine_coupling_inverse(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Inverse of :func:`affine_coupling`, ``x = (y - t) * exp(-s)``.

    The Triton version is not differentiable: ``auto`` runs the reference
    when grad mode is on and an operand requires grad.
    """
    kwargs = dict(volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    if resolve_backend("affine_coupling_inverse", backend, y, r, t, running_mean, differentiable=False, constant=running_mean) == "triton":
        return _triton_module().affine_coupling_inverse(y, r, t, **kwargs)
    return reference.affine_coupling_inverse(y, r, t, **kwargs)


def affine_coupling_reconstruct(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """The engine's fused path: ``(x, y_local)`` (see :func:`.reference.affine_coupling_reconstruct`).

    On the Triton backend ``x`` is filled during the backward through
    ``y_local`` (NOTE [lazy reconstruction] in :mod:`.triton.affine_coupling`).
    """
    kwargs = dict(volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    if resolve_backend("affine_coupling_reconstruct", backend, y, r, t, running_mean, constant=running_mean) == "triton":
        return _triton_module().affine_coupling_reconstruct(y, r, t, **kwargs)
    return reference.affine_coupling_reconstruct(y, r, t, **kwargs)


def affine_coupling_bwd(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    grad_y: Tensor,
    *,
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rebuild ``x`` and backpropagate ``grad_y`` by hand: ``(x, grad_x, grad_r, grad_t)``, not differentiable."""
    kwargs = dict(volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    if resolve_backend("affine_coupling_bwd", backend, y, r, t, grad_y, running_mean, constant=running_mean) == "triton":
        return _triton_module().affine_coupling_bwd(y, r, t, grad_y, **kwargs)
    return reference.affine_coupling_bwd(y, r, t, grad_y, **kwargs)


def affine_coupling_bwd_into(
    y: Tensor,
    r: Tensor,
    t: Tensor,
    grad_y: Tensor,
    *,
    out: Tuple[Tensor, Tensor, Tensor, Tensor],
    volume_norm: Optional[str] = None,
    clamp: float = 2.0,
    running_mean: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> None:
    """:func:`affine_coupling_bwd` into ``out = (x, grad_x, grad_r, grad_t)``, which may alias ``(y, grad_y, r, t)``.

    The reference works a slice at a time in place (NOTE [backward into the operands] in
    :mod:`.reference`); the Triton backend runs the fused backward kernel once, writing straight into
    ``out`` (NOTE [writing over the operands] in :mod:`.triton.affine_coupling`). Neither allocates a
    tensor of ``out``'s size (see :func:`affine_coupling_into`).
    """
    kwargs = dict(volume_norm=volume_norm, clamp=clamp, running_mean=running_mean)
    if resolve_backend("affine_coupling_bwd_into", backend, y, r, t, grad_y, *out, running_mean, constant=running_mean) == "triton":
        _triton_module().affine_coupling_bwd_into(y, r, t, grad_y, out=out, **kwargs)
        return
    reference.affine_coupling_bwd_into(y, r, t, grad_y, out=out, **kwargs)
