"""InvertibleSequential: a chain of invertible blocks trained without stored activations."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import contextlib
import warnings

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor, nn

from ._state import recomputation
from .adapters import wrap
from .block import CallContext, InvertibleModule, LogDet, Tensors, add_optional, call_forward
from .checks import captured_grad_tensors, check_finite, check_reconstruction, contract_checks
from .drift import DRIFT_POLICIES, CallSite, Fingerprinter, drift_message
from .errors import DriftError, DriftWarning
from .function import run_invertible
from .ownership import caller_storages, free_levels
from .run import DriftReport, InvertibleRun

__all__ = ["InvertibleSequential", "MODES"]

MODES = ("invertible", "checkpoint", "autograd")  # the engine's own first; also the order plan reports them in
_MAX_CHECKED_SIGNATURES = 64
TensorOrTensors = Union[Tensor, Tensors]


class InvertibleSequential(nn.Module):
    """Run invertible blocks in sequence; in backward, rebuild activations instead of storing them.

    In ``"invertible"`` mode (the default) the forward keeps only the final
    outputs; backward reconstructs each block's input from its output with the
    block's inverse (or its fused :meth:`~InvertibleModule.reconstruct`) and
    backpropagates through one block at a time, so activation memory does not
    grow with depth. ``"autograd"`` stores everything (for comparison and
    debugging) and ``"checkpoint"`` wraps each block in
    ``torch.utils.checkpoint``. Parameters, state dicts and results are the
    same in all three modes.

    Args:
        *blocks: :class:`InvertibleModule` instances, or modules of the FrEIA or
            normflows / memcnn conventions (adapted with :func:`wrap`).
        mode: ``"invertible"``, ``"autograd"`` or ``"checkpoint"``; can be changed later.
        preserve_rng_state: replay each block's RNG state when it is recomputed,
            so that dropout and other random blocks see the same draws.
        debug: after every block, check that its inverse reconstructs its input
            (relative error at most ``debug_tolerance``) and that outputs are
            finite. Each check syncs the device: for debugging only.
        debug_tolerance: largest relative reconstruction error accepted in debug mode.
        drift: what invertible backward does when a rebuilt block input differs
            from the true one by more than ``drift_tolerance`` (relative error,
            estimated from a fingerprint of every element of each level kept in
            forward, a few random projections: NOTE [whole-level fingerprint] in
            :mod:`.drift`): ``"warn"`` (default) issues a :class:`DriftWarning`
            once per sequence and call site; ``"raise"`` raises
            :class:`DriftError`; ``"recompute"`` rebuilds that block's input
            exactly by running forward again from the nearest exact state kept in
            forward (so its gradients are those of checkpoint mode; this syncs the
            host once per block); ``"off"`` monitors nothing and costs nothing.
            Memory: the fingerprints (8 values per ``(n, c)`` of each level and
            block: 1 KiB for a ``(2, 16, H, W)`` level) for all but
            ``"off"``; ``"recompute"`` also keeps the sequence's input (a
            reference to the caller's tensor). See NOTE [drift monitoring] in
            :mod:`.function`.
        drift_tolerance: largest relative error of a rebuilt input that passes;
            ``None`` picks it from the compute dtype (the autocast dtype under
            autocast, else the input's): 1e-9 for float64, 1e-4 for float32,
            5e-2 for bfloat16 and float16 (NOTE [default drift tolerances] in
            :mod:`.drift`: healthy float32 flows rebuild to ~1e-6).
        anchor_every: keep the exact input of every ``k``-th block (0, k, 2k, ...);
            backward uses it instead of the rebuilt one, so drift cannot compound
            over more than ``k`` blocks and ``"recompute"`` restarts at most
            ``k - 1`` blocks back. Costs one state (the levels a block changes)
            per anchor. ``None``: no anchors.

    Attributes:
        last_drift: after each invertible backward with monitoring on, one float per
            block, the estimated relative error of that block's rebuilt input
            (0.0 where an anchor or the recomputation supplied the exact input);
            ``None`` before the first such backward, and after a backward with
            ``drift="off"``. Checkpoint and autograd modes rebuild nothing and
            leave it as it was.
        last_recomputed: indices of the blocks ``"recompute"`` rebuilt in the last
            backward (empty tuple otherwise).

    Example:
        >>> import torch
        >>> from pyramidflow import InvertibleSequential
        >>> from pyramidflow.engine.coupling import AffineCoupling
        >>> seq = InvertibleSequential(*[AffineCoupling(4, 8, parity=i % 2) for i in range(4)])
        >>> x = torch.randn(2, 4, 16, 16, requires_grad=True)
        >>> y, logdet = seq(x)
        >>> (y.square().sum() - logdet.sum()).backward()
        >>> x.grad.shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(
        self,
        *blocks: nn.Module,
        mode: str = "invertible",
        preserve_rng_state: bool = True,
        debug: bool = False,
        debug_tolerance: float = 1e-4,
        drift: str = "warn",
        drift_tolerance: Optional[float] = None,
        anchor_every: Optional[int] = None,
    ) -> None:
        super().__init__()
        if len(blocks) == 1 and isinstance(blocks[0], (list, tuple)):
            blocks = tuple(blocks[0])
        self.blocks = nn.ModuleList(wrap(block, where=f"InvertibleSequential: block {i}") for i, block in enumerate(blocks))
        self.mode = mode
        self.preserve_rng_state = preserve_rng_state
        self.debug = debug
        self.debug_tolerance = debug_tolerance
        self.drift = drift
        self.drift_tolerance = drift_tolerance
        self.anchor_every = anchor_every
        self.last_drift: Optional[Tuple[float, ...]] = None
        self.last_recomputed: Tuple[int, ...] = ()
        self._fingerprinter = Fingerprinter()
        self._warned_sites: set = set()
        self._checked_signatures: set = set()  # NOTE [contract checks] in .checks

    @property
    def drift(self) -> str:
        return self._drift

    @drift.setter
    def drift(self, drift: str) -> None:
        if drift not in DRIFT_POLICIES:
            raise ValueError(f"InvertibleSequential: drift must be one of {DRIFT_POLICIES}, got {drift!r}.")
        self._drift = drift

    @property
    def drift_tolerance(self) -> Optional[float]:
        return self._drift_tolerance

    @drift_tolerance.setter
    def drift_tolerance(self, tolerance: Optional[float]) -> None:
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0):
            raise ValueError(
                f"InvertibleSequential: drift_tolerance must be a relative error >= 0 or None (per-dtype default), got {tolerance!r}."
            )
        self._drift_tolerance = None if tolerance is None else float(tolerance)

    @property
    def anchor_every(self) -> Optional[int]:
        return self._anchor_every

    @anchor_every.setter
    def anchor_every(self, every: Optional[int]) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"InvertibleSequential: anchor_every must be a block count >= 1 or None, got {every!r}.")
        self._anchor_every = every

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"InvertibleSequential: mode must be one of {MODES}, got {mode!r}.")
        self._mode = mode

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> InvertibleModule:
        return self.blocks[index]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, drift={self.drift!r}"

    def forward(
        self, x: TensorOrTensors, *, release_outputs: bool = False, input_source: Optional[Callable[[], TensorOrTensors]] = None,
        consume_input: bool = False,
    ) -> Tuple[TensorOrTensors, Tensor]:
        """Map ``x`` (a tensor or a tuple of tensors) to ``(y, logdet)``.

        Args:
            x: the input, a tensor or a tuple of tensors (levels).
            release_outputs: the caller gives the outputs up: it will not read them
                after backward has started, and their gradients come from this
                use alone (not also routed to another branch of the graph).
                Invertible backward may then reuse their storage and that of
                their incoming gradients in place (less memory; NOTE [writing in
                place in backward]). Changing an output in place before backward
                still raises. Ignored by the other modes.
            input_source: a function that computes ``x`` again, with the same values (e.g. from
                the images the caller holds anyway). Under ``drift="recompute"`` invertible mode
                then keeps no copy of block 0's input for the whole backward (one state less) and
                calls it only when a block drifts (NOTE [input source]). Ignored by the other modes.
            consume_input: the caller gives ``x`` up: it will not read it again (its values are then
                undefined). A forward without a graph (invertible mode's, or any mode's under
                ``no_grad``) may then let blocks write their outputs over it, as it always may over
                the levels earlier blocks made (NOTE [forward in place]): one level less at a time.
                An input that requires grad is never overwritten.

        Returns:
            ``y`` with the structure of ``x``, and ``logdet`` of shape ``(N,)``
            (zeros when every block preserves volume).
        """
        xs, single = _as_tuple(x, "forward")
        signature = self._unchecked_signature(xs)
        if signature is None:
            return self._forward(xs, single, release_outputs, input_source, consume_input)
        with contract_checks(self.blocks, lambda i: self._where(self.blocks[i])):
            result = self._forward(xs, single, release_outputs, input_source, consume_input)
        if len(self._checked_signatures) >= _MAX_CHECKED_SIGNATURES:  # many input sizes: forget, check again
            self._checked_signatures.clear()
        self._checked_signatures.add(signature)
        return result

    def _unchecked_signature(self, xs: Tensors) -> Optional[tuple]:
        """The signature of ``xs`` if its contract check is due (NOTE [contract checks] in .checks), else None.

        Never under torch.compile or torch.export: comparing symbolic shapes would pin a dynamic batch.
        """
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return None
        if not all(isinstance(size, int) for x in xs for size in x.shape):
            return None
        signature = (tuple(map(id, self.blocks)), tuple((x.shape, x.dtype, x.device) for x in xs))
        return None if signature in self._checked_signatures else signature

    def _forward(self, xs: Tensors, single: bool, release_outputs: bool,
                 input_source: Optional[Callable[[], TensorOrTensors]] = None,
                 consume_input: bool = False) -> Tuple[TensorOrTensors, Tensor]:
        if self.debug:
            ys, logdet = self._forward_debug(xs)
        elif self.mode == "invertible" and torch.is_grad_enabled():
            run = self._make_run()
            run.release_outputs = bool(release_outputs)
            run.consume_input = bool(consume_input)
            if input_source is not None:
                run.input_source = lambda: _as_tuple(input_source(), "input_source")[0]
            ys, logdet = run_invertible(run, xs)
        elif self.mode == "checkpoint" and torch.is_grad_enabled():
            ys, logdet = self._forward_blocks(xs, self._checkpointed)
        elif not torch.is_grad_enabled():  # any mode: nothing to save, blocks may write in place
            ys, logdet = self._forward_blocks(xs, call_forward, caller_storages(xs, consume_input))
        else:  # plain autograd
            ys, logdet = self._forward_blocks(xs, call_forward)
        return (ys[0] if single else ys), _logdet_or_zeros(logdet, ys)

    def inverse(self, y: TensorOrTensors) -> Tuple[TensorOrTensors, Tensor]:
        """Map ``y`` back to ``(x, logdet)``, with plain autograd (the inverse is not memory-saving)."""
        ys, single = _as_tuple(y, "inverse")
        total: LogDet = None
        for block in reversed(self.blocks):
            ys, logdet = block.inverse(ys)
            ys = tuple(ys)
            total = add_optional(total, logdet)
        return (ys[0] if single else ys), _logdet_or_zeros(total, ys)

    # -- the three ways to run the blocks ------------------------------------------

    def _make_run(self) -> InvertibleRun:
        params: List[nn.Parameter] = []
        index = {}
        block_params = []
        for block in self.blocks:
            captured = captured_grad_tensors(block)
            if captured is not None:
                raise NotImplementedError(
                    f"{self._where(block)} holds the tensor {captured!r}, which requires grad but is not a "
                    "parameter: invertible mode passes gradients only to inputs and parameters. Register it "
                    "as an nn.Parameter, or use mode='autograd'."
                )
            ids = []
            for p in block.parameters():
                if p.requires_grad:
                    if id(p) not in index:
                        index[id(p)] = len(params)
                        params.append(p)
                    ids.append(index[id(p)])
            block_params.append(tuple(dict.fromkeys(ids)))
        run = InvertibleRun(list(self.blocks), params, block_params, preserve_rng_state=self.preserve_rng_state)
        run.drift = self.drift
        run.drift_tolerance = self.drift_tolerance
        run.anchor_every = self.anchor_every
        run.where = "InvertibleSequential"
        if self.drift == "off":
            self.last_drift = None  # nothing measured this step: a stale value would mislead
            self.last_recomputed = ()
        else:
            run.fingerprinter = self._fingerprinter
            run.report = self._report_drift
            if self.drift == "warn":
                run.fwd_call_site = CallSite.find()
        return run

    def _report_drift(self, report: DriftReport) -> None:
        """Called once at the end of an invertible backward: record, then warn or raise per the policy."""
        self.last_drift = report.drifts
        self.last_recomputed = report.recomputed
        if report.policy == "recompute" or all(d <= report.tolerance for d in report.drifts):
            return
        names = [type(block).__name__ for block in self.blocks]
        message = drift_message("InvertibleSequential", report.drifts, report.tolerance, names)
        if report.policy == "raise":
            raise DriftError(message)
        site = report.call_site
        if report.policy == "warn" and site is not None and site not in self._warned_sites:
            self._warned_sites.add(site)
            warnings.warn_explicit(message, DriftWarning, site.filename, site.lineno, module=site.module)

    def _forward_blocks(self, xs: Tensors, call, protected: Optional[set] = None) -> Tuple[Tensors, LogDet]:
        """Each block in turn. ``protected``: the storages no block may write over, the rest being free
        (NOTE [forward in place]); ``None``: none free (a graph is recorded, or debug mode compares each
        output with its input)."""
        total: LogDet = None
        for block in self.blocks:
            context = CallContext.now(overwritable=() if protected is None else free_levels(xs, protected))
            xs, logdet = call(block, xs, context)
            xs = tuple(xs)
            total = add_optional(total, logdet)
        return xs, total

    def _checkpointed(self, block: InvertibleModule, xs: Tensors, context: CallContext):
        return torch_checkpoint.checkpoint(
            call_forward,
            block,
            xs,
            context,
            use_reentrant=False,
            preserve_rng_state=self.preserve_rng_state,
            context_fn=lambda: (contextlib.nullcontext(), recomputation(block)),
        )

    def _forward_debug(self, xs: Tensors) -> Tuple[Tensors, LogDet]:
        def call(block, state, context):
            ys, logdet = call_forward(block, state, context)
            check_finite(ys, logdet, where=self._where(block))
            check_reconstruction(block, state, self.debug_tolerance, where=self._where(block))
            return ys, logdet

        return self._forward_blocks(xs, call)

    def _where(self, block: nn.Module) -> str:
        index = next(i for i, b in enumerate(self.blocks) if b is block)
        return f"InvertibleSequential: block {index} ({type(block).__name__})"


def _logdet_or_zeros(logdet: LogDet, ys: Tensors) -> Tensor:
    if logdet is not None:
        return logdet
    return torch.zeros(ys[0].shape[0], dtype=ys[0].dtype, device=ys[0].device)


def _as_tuple(x: TensorOrTensors, method: str) -> Tuple[Tensors, bool]:
    if isinstance(x, Tensor):
        return (x,), True
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, Tensor) for t in x):
        return tuple(x), False
    raise TypeError(
        f"InvertibleSequential.{method}: expected a tensor or a non-empty tuple of tensors, got {type(x).__name__}."
    )
