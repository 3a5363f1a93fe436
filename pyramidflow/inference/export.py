"""Export a finished checkpoint as one inference graph: normalised images in, anomaly map and score out.

The graph is :class:`InferenceGraph`: the model in eval mode with the latent template baked in as
constants, mapping ImageNet-normalised images ``(N, 3, H, W)`` at the trained size to the anomaly map
``(N, 1, H, W)`` and the image score ``(N,)``, computed by the same functions as ``pyramidflow
eval``/``predict`` (:func:`pyramidflow.model.anomaly_map`, :func:`pyramidflow.model.image_score`),
before any optional smoothing. Two formats:

* ``"onnx"``: torch's ``torch.export``-based exporter at opset :data:`ONNX_OPSET`, checked with
  ``onnx.checker`` and, when onnxruntime is installed, run once against PyTorch before the file is
  kept. Needs the ``export`` extra (``pip install 'pyramidflow[export]'``: onnx, onnxscript,
  onnxruntime).
* ``"torchscript"``: ``torch.jit.trace``, loadable with ``torch.jit.load`` without pyramidflow. The
  trace keeps the batch dimension free. torch marks TorchScript as deprecated: prefer ONNX.

# NOTE [what the exported graph contains]
Eval mode only: volume normalisation subtracts its running means, the 1×1 convs' LU factors are
folded into plain weights, and nothing updates a buffer. Every Python-level check of the model
(image size, CVN resolution, pyramid shapes) runs once on the example input while the graph is
recorded and leaves no branch in it, so the graph is straight-line: fixed height and width (those of
the training run), a batch dimension that is fixed (``batch_size=N``) or free (``batch_size=None``).
The coupling op runs on its PyTorch reference (the Triton kernels are not exportable).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import atomic_write
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..model import PyramidFlow, image_score

__all__ = ["EXPORT_FORMATS", "ONNX_OPSET", "InferenceGraph", "export_checkpoint", "export_graph"]

EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
# Largest difference accepted between the exported graph and PyTorch on the probe batch (float32).
VERIFY_ATOL = 1e-4


class InferenceGraph(nn.Module):
    """A PyramidFlow and its template as one module: ``images -> (anomaly_map, score)``.

    The template is stored as buffers, so an exported graph carries it as constants. The module is
    put in eval mode and its couplings on the PyTorch reference op (NOTE [what the exported graph
    contains]).

    Args:
        model: a trained :class:`pyramidflow.PyramidFlow` (its running means set).
        template: the latent template, one ``(1, C, H_i, W_i)`` tensor per level.

    Example:
        >>> from pyramidflow.model import PyramidFlow, PyramidFlowConfig
        >>> model = PyramidFlow(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=2,
        ...                                       volume_norm="SVN"))
        >>> images = torch.randn(2, 3, 16, 16)
        >>> graph = InferenceGraph(model, [z[:1] for z in model.eval()(images)])
        >>> maps, scores = graph(images)
        >>> tuple(maps.shape), tuple(scores.shape)
        ((2, 1, 16, 16), (2,))
    """

    def __init__(self, model: PyramidFlow, template: Sequence[Tensor]) -> None:
        super().__init__()
        self.model = model.eval()
        for block in getattr(getattr(model, "flow", None), "blocks", ()):
            if hasattr(block, "backend"):
                block.backend = "reference"
        self.num_levels = len(template)
        for level, tensor in enumerate(template):
            self.register_buffer(f"template_{level}", tensor.detach().clone())

    def template(self) -> Tuple[Tensor, ...]:
        return tuple(getattr(self, f"template_{level}") for level in range(self.num_levels))

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """``(N, 3, H, W)`` normalised images -> anomaly map ``(N, 1, H, W)`` and score ``(N,)``."""
        maps = self.model.anomaly_map(images, self.template())  # the maps `eval` computes
        return maps, image_score(maps)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "onnx",
    batch_size: Optional[int] = 1,
    verify: bool = True,
    register: bool = False,
) -> Path:
    """Write the inference graph of a finished checkpoint to ``out`` (atomically).

    Args:
        checkpoint: the ``checkpoint.pt`` of a finished ``pyramidflow train`` run.
        out: the file to write (its folder is created), e.g. ``model.onnx`` or ``model.pt``.
        format: ``"onnx"`` (opset :data:`ONNX_OPSET`) or ``"torchscript"``.
        batch_size: the graph's batch size, or ``None`` for a dynamic batch (TorchScript traces
            always accept any batch).
        verify: run the written graph once on a probe batch and refuse it (removing the file) if it
            differs from PyTorch by more than :data:`VERIFY_ATOL` (ONNX: only when onnxruntime is
            installed).
        register: refused: the graph maps images as given, without registration.

    Returns:
        ``Path(out)``.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        CheckpointError: a damaged checkpoint, or one of a run that has not finished (no template yet).
        ValueError: an unknown format or a batch size below 1.
        NotImplementedError: ``register=True``.
        ModuleNotFoundError: ONNX export without onnx / onnxscript installed.
        RuntimeError: the exported graph disagrees with PyTorch.

    Example:
        >>> export_checkpoint("runs/nut/checkpoint.pt", "nut.onnx", batch_size=None)  # doctest: +SKIP
        PosixPath('nut.onnx')
    """
    from .maps import load_for_inference

    if register:
        raise NotImplementedError(
            "export: register=True is not supported: the exported graph maps images as given; align images "
            "before the graph (pyramidflow.inference.registration) or use Detector(register=True) / --register."
        )
    _check_settings(format, batch_size)
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    graph = InferenceGraph(inference.model.float(), [t.float() for t in inference.template])
    size = _input_size(inference)
    metadata = _metadata(inference, format, batch_size, size)
    return export_graph(graph, out, image_size=size, format=format, batch_size=batch_size, metadata=metadata,
                        verify=verify)


def export_graph(
    graph: InferenceGraph,
    out: str | os.PathLike,
    *,
    image_size: Tuple[int, int],
    format: str = "onnx",
    batch_size: Optional[int] = 1,
    metadata: Optional[dict] = None,
    verify: bool = True,
) -> Path:
    """Write an :class:`InferenceGraph` to ``out`` (atomically); :func:`export_checkpoint` without the checkpoint.

    Args:
        graph: the module to export (float32, on the CPU).
        out: the file to write; its folder is created.
        image_size: ``(height, width)`` of the images the graph takes.
        format, batch_size, verify: as in :func:`export_checkpoint`.
        metadata: JSON-able values stored in the file (ONNX ``metadata_props`` as ``pyramidflow.<key>``,
            TorchScript extra file ``pyramidflow.json``).

    Returns:
        ``Path(out)``.
    """
    _check_settings(format, batch_size)
    height, width = image_size
    probe = _probe_images(2 if batch_size is None else batch_size, height, width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        if format == "onnx":
            _export_onnx(graph, probe, tmp, dynamic_batch=batch_size is None, metadata=metadata or {})
        else:
            _export_torchscript(graph, probe, tmp, metadata=metadata or {})
        if verify:
            # A graph with a free batch is also checked at another batch size than the one it was recorded at.
            free_batch = batch_size is None or format == "torchscript"
            probes = [probe, probe[:1]] if free_batch and probe.shape[0] > 1 else [probe]
            _verify(graph, tmp, format, probes, out)
    return out


# ----------------------------------------------------------------------------------------------------


def _check_settings(format: str, batch_size: Optional[int]) -> None:
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export: format must be one of {EXPORT_FORMATS}, got {format!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"export: batch_size must be a positive int or None (dynamic), got {batch_size!r}.")
    if format == "onnx":
        _require("onnx", "onnxscript")


def _require(*modules: str) -> None:
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"export: ONNX export needs {', '.join(missing)}; install them with pip install 'pyramidflow[export]', "
            "or use --format torchscript."
        )


def _input_size(inference) -> Tuple[int, int]:
    """The images' (height, width): the size the run was trained at."""
    height, width = inference.image_size
    return int(height), int(width)


def _probe_images(batch: int, height: int, width: int) -> Tensor:
    """A fixed batch of normalised-image-like inputs (standard normal), the same on every call."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, height, width, generator=generator)


def _metadata(inference, format: str, batch_size: Optional[int], size: Tuple[int, int]) -> dict:
    from .._utils import VERSION
    from ..calibration import stored_mask_rule, stored_pixel_rule, stored_thresholds

    checkpoint = inference.checkpoint
    image_threshold, pixel_threshold, thresholds_from = stored_thresholds(checkpoint)
    mask_rule = stored_mask_rule(checkpoint)
    return {
        "producer": f"pyramidflow {VERSION}",
        "format": format,
        "opset": ONNX_OPSET if format == "onnx" else None,
        "input": f"{INPUT_NAME}: float32 ({batch_size or 'N'}, 3, {size[0]}, {size[1]}), RGB, ImageNet-normalised",
        "normalize_mean": list(IMAGENET_MEAN),
        "normalize_std": list(IMAGENET_STD),
        "outputs": f"{OUTPUT_NAMES[0]}: ({batch_size or 'N'}, 1, {size[0]}, {size[1]}); {OUTPUT_NAMES[1]}: ({batch_size or 'N'},)",
        "image_size": list(size),
        "checkpoint": str(checkpoint.path),
        "checkpoint_step": int(checkpoint.step),
        "model_config": checkpoint.model_config,
        "score_stats": checkpoint.score_stats,
        # The decisions stay outside the graph: score > image_threshold flags a part; the defect pixels are
        # those of each 8-connected region of map > pixel_mask_low whose peak is above pixel_threshold,
        # and within it above pixel_mask_peak_fraction of that peak (pyramidflow.pixel_threshold.MaskRule:
        # the rule `predict` uses, set on held-out good images; with the "fpr" rule, map > pixel_threshold).
        # For a flagged part the seed and the floor are capped just below the map's own peak, so its mask is never empty.
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "pixel_rule": stored_pixel_rule(checkpoint),
        "pixel_mask_low": mask_rule.low,
        "pixel_mask_peak_fraction": mask_rule.fraction,
        "thresholds_from": thresholds_from,
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter: tracer warnings about our shape checks (NOTE [what the exported
    graph contains]), deprecation notices, and the ONNX exporter's progress lines."""
    import io
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _export_onnx(graph: InferenceGraph, probe: Tensor, path: Path, *, dynamic_batch: bool, metadata: dict) -> None:
    import onnx

    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            graph, (probe,), dynamo=True, opset_version=ONNX_OPSET, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
        )
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"pyramidflow.{key}", json.dumps(value)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


def _export_torchscript(graph: InferenceGraph, probe: Tensor, path: Path, *, metadata: dict) -> None:
    # The file is for inference: outputs that required grad would make every plain call build a graph
    # (and keep its activations) unless the caller remembers torch.no_grad(). A copy is frozen, since
    # the trace shares the parameters of the module it records.
    frozen = copy.deepcopy(graph).requires_grad_(False)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(frozen, (probe,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"pyramidflow.json": json.dumps(metadata)})


def _verify(graph: InferenceGraph, path: Path, format: str, probes: Sequence[Tensor], out: Path) -> None:
    """Run the written file on the probe batches, in a runtime other than the one that recorded it."""
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(images: Tensor) -> list:
            return [torch.from_numpy(a) for a in session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})]
    else:
        with _quiet():
            loaded = torch.jit.load(str(path))

        def run(images: Tensor) -> list:
            with torch.no_grad():
                return list(loaded(images))

    for probe in probes:
        with torch.no_grad():
            expected = graph(probe)
        for name, a, b in zip(OUTPUT_NAMES, run(probe), expected):
            error = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
            if not error <= VERIFY_ATOL:
                raise RuntimeError(
                    f"export: the exported {format} graph's {name} differs from PyTorch's by {error:.3g} (more than "
                    f"{VERIFY_ATOL}) on a probe batch of {probe.shape[0]}; {out} was not written. Please report this "
                    "with the checkpoint's settings."
                )
