"""Host-side helpers of the Triton kernels: argument checks, memory order, launch settings.

Everything here runs on the host, imports no triton at module level and does
no work at import time. The kernels' launchers call :func:`check_tensor` and
:func:`check_same` on their inputs, :func:`channels_last_order` to pick the
order in which the elements are visited (and the layout of the outputs), and
:func:`elementwise_launch` / :func:`reduction_blocks` for block sizes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference import VOLUME_NORMS

__all__ = [
    "SUPPORTED_DTYPES",
    "interpreter_mode",
    "check_tensor",
    "check_same",
    "check_operands",
    "check_options",
    "check_out",
    "mark_written",
    "flat_running_mean",
    "mean_shape",
    "channels_last_order",
    "empty_in_order",
    "strides",
    "needs_int64",
    "elementwise_launch",
    "reduction_blocks",
    "elementwise_configs",
    "reduction_tiles",
    "KernelVariant",
    "REDUCTION_WARPS",
    "TRITON_DTYPES",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton's names of SUPPORTED_DTYPES, as a kernel signature spells a pointer's element type.
TRITON_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class KernelVariant:
    """One compiled form of a kernel, as a launcher can start it on a GPU (the compile matrix's unit).

    Attributes:
        module: the kernel's module, e.g. ``"pyramidflow.kernels.triton.affine_coupling"``.
        kernel: the ``@triton.jit`` function's name.
        constexprs: the compile-time arguments, as sorted ``(name, value)`` pairs.
        dtype: element type of the tensor operands (``"fp32"``, ``"bf16"``, ``"fp16"``).
        num_warps: warps per program.
        fp32_pointers: pointer arguments that are float32 whatever ``dtype`` is (the VN means, partial sums).
    """

    module: str
    kernel: str
    constexprs: Tuple[Tuple[str, Any], ...]
    dtype: str
    num_warps: int = 4
    fp32_pointers: Tuple[str, ...] = ()

    @classmethod
    def make(cls, module: str, kernel: str, dtype: str, num_warps: int, fp32_pointers: Sequence[str] = (), **constexprs: Any) -> "KernelVariant":
        return cls(module, kernel, tuple(sorted(constexprs.items())), dtype, num_warps, tuple(fp32_pointers))

    def axes(self) -> Dict[str, Any]:
        """The variant's values by axis name (constexprs, dtype, num_warps), for covering arrays and tables."""
        return dict(self.constexprs, dtype=self.dtype, num_warps=self.num_warps)

    def label(self) -> str:
        flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        return f"{self.kernel}[{self.dtype} w{self.num_warps} {flags}]"

# Fixed settings used under the interpreter (TRITON_INTERPRET=1), where the
# autotuner cannot run: the interpreter's cost is per program and per
# operation, so large blocks (few programs) keep it fast.
_INTERPRETER_BLOCK = 4096
_INTERPRETER_TILE = 4096
# NOTE [elements per thread]
# At most 8 elements per thread (BLOCK_SIZE / (32 num_warps)). The compile
# matrix (kernels/triton/_compile.py) found that 32 per thread (4096 with 4
# warps) spills registers in the fused backward on sm_80
# to sm_90 (255 registers and a 184-byte stack frame), and 16 per thread
# needs up to 247 registers, which leaves one warp group per multiprocessor.
# Candidates benchmarked once per (size, variant) on a GPU: (BLOCK_SIZE, num_warps).
_AUTOTUNE_CONFIGS = ((512, 4), (1024, 4), (1024, 8), (2048, 8))
# Elements per program of the VN partial sums on a GPU (groups x members) and its warps: 2 elements
# per thread. With 2048 and 4 warps the variant summing both means with 64-bit offsets spilled 56 to
# 960 bytes per thread on sm_80 to sm_90; with 1024 and 8 warps, still 8 bytes on sm_80 for a
# 4 x 256 tile (compile matrix).
_GPU_TILE = 512
REDUCTION_WARPS = 8


def interpreter_mode() -> bool:
    """Whether Triton runs interpreted on the CPU (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def check_tensor(where: str, name: str, value: Any, *, dtypes: Sequence[torch.dtype] = SUPPORTED_DTYPES) -> Tensor:
    """Check that ``value`` is a 4-D tensor of a supported dtype; return it.

    Raises:
        TypeError: not a tensor, or a dtype the kernels do not handle.
        ValueError: not 4-D ``(N, C, H, W)``, or empty.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{where}: {name} has dtype {value.dtype}; the Triton kernels take {names}: cast it with .to(torch.float32).")
    if value.dim() != 4:
        raise ValueError(
            f"{where}: {name} must be 4-D (N, C, H, W), got shape {tuple(value.shape)}; add the missing dimensions with .view()."
        )
    if value.numel() == 0:
        raise ValueError(f"{where}: {name} is empty (shape {tuple(value.shape)}); call the reference op for empty tensors.")
    return value


def check_same(where: str, reference_name: str, reference: Tensor, **others: Tensor) -> None:
    """Check that every tensor in ``others`` has the shape and device of ``reference``.

    Raises:
        ValueError: a shape or a device differs.
    """
    for name, other in others.items():
        if other.shape != reference.shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(other.shape)} but {reference_name} has {tuple(reference.shape)}; "
                "all operands must have the same shape (expand or reshape them first)."
            )
        if other.device != reference.device:
            raise ValueError(
                f"{where}: {name} is on {other.device} but {reference_name} is on {reference.device}; "
                f"move it with .to({reference_name}.device)."
            )


def check_operands(where: str, first_name: str, first: Tensor, **others: Tensor) -> None:
    """Types, dtypes, shapes and devices of the ``(N, C, H, W)`` operands of a launcher."""
    check_tensor(where, first_name, first)
    for name, value in others.items():
        check_tensor(where, name, value)
    check_same(where, first_name, first, **others)
    if first.device.type != "cuda" and not interpreter_mode():
        raise ValueError(
            f"{where}: {first_name} is on {first.device}, but the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 for CPU tensors); use backend='reference' for CPU tensors."
        )


def _same_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two same-shaped tensors are views of exactly the same elements."""
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype


def _shares_elements(a: Tensor, b: Tensor) -> Optional[bool]:
    """Whether ``a`` and ``b`` share an element: True, False, or ``None`` where only enumerating would tell.

    Byte ranges that do not meet share nothing; two dense tensors (contiguous
    in some memory format: no gaps) whose ranges meet share their overlap.
    Strided views with gaps (the channel chunks ``r`` and ``t`` of one tensor)
    may interleave without sharing: undecided.
    """
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    spans = []
    for x in (a, b):
        start = x.data_ptr()
        furthest = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride()))
        spans.append((start, start + (furthest + 1) * x.element_size()))
    (a0, a1), (b0, b1) = spans
    if a1 <= b0 or b1 <= a0:
        return False
    if _same_elements(a, b):
        return True

    def dense(x: Tensor) -> bool:
        return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)

    return True if dense(a) and dense(b) else None


def check_out(where: str, first_name: str, first: Tensor, outputs: Dict[str, Tensor], operands: Dict[str, Tensor]) -> None:
    """Check the ``out`` tensors of an into-launcher (NOTE [writing over the operands] in :mod:`.affine_coupling`).

    Each output is a supported ``(N, C, H, W)`` tensor shaped like the
    operands, on their device; it is exactly an operand or shares no element
    with any (checked where decidable, see :func:`_shares_elements`); no two
    outputs share an element.

    Raises:
        TypeError, ValueError: the output and the rule it breaks, and what to pass instead.
    """
    for name, value in outputs.items():
        check_tensor(where, f"out {name}", value)
    check_same(where, first_name, first, **{f"out {name}": value for name, value in outputs.items()})
    for name, value in outputs.items():
        for other, operand in operands.items():
            if _shares_elements(value, operand) and not _same_elements(value, operand):
                raise ValueError(
                    f"{where}: out {name} overlaps the operand {other} without being it (another view of the same memory); "
                    f"pass {other} itself or a separate tensor."
                )
    names = list(outputs)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if _shares_elements(outputs[name], outputs[other]):
                raise ValueError(f"{where}: out {name} and out {other} share memory; each result needs its own tensor.")


def mark_written(x: Tensor) -> None:
    """Bump ``x``'s version counter after a kernel wrote into it, as an in-place op would (autograd's checks see it)."""
    torch.autograd.graph.increment_version(x)


def check_options(where: str, volume_norm: Optional[str], clamp: float) -> None:
    if volume_norm not in VOLUME_NORMS:
        raise ValueError(f"{where}: volume_norm must be one of {VOLUME_NORMS}, got {volume_norm!r}.")
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0:
        raise ValueError(f"{where}: clamp must be a positive number, got {clamp!r}; the soft clamp divides by it.")


def flat_running_mean(where: str, running_mean: Tensor, volume_norm: str, r: Tensor) -> Tensor:
    """The running mean as the kernels read it: float32, flat, in the order of the VN mean."""
    if not isinstance(running_mean, Tensor):
        raise TypeError(f"{where}: running_mean must be a torch.Tensor or None, got {type(running_mean).__name__}.")
    shape = mean_shape(volume_norm, r.shape)
    try:
        fits = torch.broadcast_shapes(running_mean.shape, shape) == torch.Size(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{where}: running_mean has shape {tuple(running_mean.shape)}, which does not broadcast to the "
            f"{volume_norm} mean shape {shape}; pass a mean of shape {shape}."
        )
    if running_mean.device != r.device:
        raise ValueError(f"{where}: running_mean is on {running_mean.device} but r is on {r.device}; move it with .to(r.device).")
    return running_mean.detach().expand(shape).to(torch.float32).contiguous().view(-1)


def mean_shape(volume_norm: str, shape: torch.Size) -> Tuple[int, int, int, int]:
    """Shape of the VN mean of an ``(N, C, H, W)`` tensor: ``(1, 1, H, W)`` (CVN) or ``(1, C, 1, 1)`` (SVN)."""
    _, c, h, w = shape
    return (1, 1, h, w) if volume_norm == "CVN" else (1, c, 1, 1)


def channels_last_order(x: Tensor) -> bool:
    """Whether visiting ``x`` in ``(n, h, w, c)`` order follows its memory better than ``(n, c, h, w)``.

    True for channels-last tensors and for channel slices of them; the
    outputs of a kernel are then allocated channels-last too, so that every
    output is written in the order it is visited.
    """
    n, c, h, w = x.shape
    if c == 1 or h * w == 1:
        return False
    inner = x.stride(3) if w > 1 else x.stride(2)
    return x.stride(1) < inner


def empty_in_order(shape: torch.Size, dtype: torch.dtype, device: torch.device, channels_last: bool) -> Tensor:
    """An uninitialised ``(N, C, H, W)`` tensor, dense in the visiting order of :func:`channels_last_order`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def strides(x: Tensor) -> Tuple[int, int, int, int]:
    """The ``(n, c, h, w)`` element strides of a 4-D tensor (any layout, views included)."""
    sn, sc, sh, sw = x.stride()
    return sn, sc, sh, sw


def needs_int64(*tensors: Tensor) -> bool:
    """Whether some element offset of ``tensors`` may not fit in a signed 32-bit integer."""
    limit = 2**31 - 1
    for x in tensors:
        if x.numel() >= limit:
            return True
        furthest = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride()))
        if furthest >= limit:
            return True
    return False


def _elementwise_configs():
    import triton  # noqa: PLC0415  (lazy: importing this module must not import triton)

    return [triton.Config({"BLOCK_SIZE": b}, num_warps=w) for b, w in _AUTOTUNE_CONFIGS]


def elementwise_configs() -> Tuple[Tuple[int, int], ...]:
    """The ``(BLOCK_SIZE, num_warps)`` pairs the autotuner may launch an elementwise kernel with on a GPU."""
    return _AUTOTUNE_CONFIGS


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: Any, key: Tuple[str, ...]) -> Any:
    """``kernel`` wrapped in ``triton.autotune`` over the elementwise block sizes, built once per kernel."""
    import triton  # noqa: PLC0415

    return triton.autotune(configs=_elementwise_configs(), key=list(key))(kernel)


def elementwise_launch(kernel: Any, n_elements: int, key: Tuple[str, ...], args: Dict[str, Any]) -> None:
    """Launch a 1-D elementwise kernel over ``n_elements`` with a ``BLOCK_SIZE`` meta-parameter.

    On a GPU the block size and warp count are autotuned (once per value of the
    arguments named in ``key``, cached by Triton's autotuner); under the
    interpreter, where the autotuner cannot run, a fixed block size is used.

    Args:
        kernel: the ``@triton.jit`` kernel; it must take ``BLOCK_SIZE: tl.constexpr``.
        n_elements: number of elements the grid must cover.
        key: names of the arguments whose values select a tuned configuration.
        args: every kernel argument by name (``BLOCK_SIZE`` excluded).
    """
    import triton  # noqa: PLC0415

    if interpreter_mode():
        block = _INTERPRETER_BLOCK
        kernel[(triton.cdiv(n_elements, block),)](**args, BLOCK_SIZE=block)
        return
    grid: Callable[[Dict[str, Any]], Tuple[int]] = lambda meta: (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)
    _autotuned(kernel, key)[grid](**args)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _reduction_tile(n_groups: int, n_members: int, interpreted: bool) -> Tuple[int, int]:
    """``(block_groups, block_members)`` of :func:`reduction_blocks`."""
    tile = _INTERPRETER_TILE if interpreted else _GPU_TILE
    block_groups = min(_next_power_of_2(n_groups), 256 if interpreted else 64)
    block_members = max(16, min(_next_power_of_2(n_members), tile // block_groups))
    return block_groups, block_members


def reduction_tiles() -> Tuple[Tuple[int, int], ...]:
    """Every ``(block_groups, block_members)`` that :func:`reduction_blocks` can choose on a GPU.

    Found by asking the rule itself over group and member counts that are
    powers of two (the rule rounds both up to one), so it cannot drift from it.
    """
    found = {_reduction_tile(1 << i, 1 << j, interpreted=False) for i in range(0, 25) for j in range(0, 31)}
    return tuple(sorted(found))


def reduction_blocks(n_groups: int, n_members: int, device: torch.device) -> Tuple[int, int, int, int]:
    """Tile and split sizes of a mean over ``n_members`` values for each of ``n_groups`` groups.

    One program owns ``block_groups`` groups and one of ``splits`` contiguous
    ranges of ``chunk`` members, which it walks ``block_members`` at a time.
    The splits keep every multiprocessor busy when there are few groups (SVN:
    one group per channel, millions of members each).

    Returns:
        ``(block_groups, block_members, splits, chunk)``.
    """
    block_groups, block_members = _reduction_tile(n_groups, n_members, interpreter_mode())
    group_programs = -(-n_groups // block_groups)
    wanted = max(1, (4 * _multiprocessors(device)) // group_programs)
    splits = max(1, min(wanted, -(-n_members // block_members)))
    chunk = -(-n_members // splits)
    chunk = -(-chunk // block_members) * block_members  # whole tiles per split
    splits = -(-n_members // chunk)
    return block_groups, block_members, splits, chunk


def optional(x: Optional[Tensor], fallback: Tensor) -> Tensor:
    """``x``, or a placeholder pointer argument when a kernel does not read it."""
    return fallback if x is None else x
