"""Decisions for unlabelled images: the command an inspection line runs on new parts.

``predict`` reads image files or folders at each image's own resolution, runs the
:class:`~pyramidflow.inference.detector.Detector` at the checkpoint's calibrated
thresholds, and writes the masks, heat maps, overlays and prediction files of
:mod:`pyramidflow.inference.outputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List

import numpy as np

from ..data._io import _header_size, list_images, load_rgb
from .maps import Inference
from .tiling import check_tileable

__all__ = ["predict"]


def predict(
    inference: Inference,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    smoothing_sigma: float = 0.0,
    progress: bool = True,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    tile: bool = False,
    bit_depth: int | None = None,
    register: bool = False,
) -> List[dict]:
    """Decisions for unlabelled images (files or folders of images), at each image's resolution.

    Writes under ``out_dir``, per image: ``masks/<name>.png`` (the binary defect mask),
    ``maps/<name>.png`` (the heat map), ``overlays/<name>.png`` (with the predicted outline); and
    ``predictions.json`` / ``predictions.csv`` (score, is_anomalous, regions, the three files), and
    ``report.html`` (every image by score, :mod:`pyramidflow.inference.report`). The
    name is the image's path under the inputs' common folder (:func:`pyramidflow.inference.outputs.output_names`),
    so images of different folders never overwrite each other. See :mod:`pyramidflow.inference.outputs`.

    Args:
        image_threshold, pixel_threshold: override the checkpoint's calibrated thresholds.
        tile: tiled inference at native resolution (:mod:`pyramidflow.inference.tiling`).
        bit_depth: significant bits of 16-bit images; ``None`` reads them as training did
            (:attr:`Inference.bit_depth`).
        register: align each image to the training images first (``Detector(register=True)``).

    Returns:
        One ``{"path", "score", "is_anomalous", "regions", "mask", "map", "overlay"}`` dict per image.
    """
    from tqdm.auto import tqdm

    from ..calibration import check_threshold
    from .outputs import output_names, write_predictions
    from .detector import Detector
    from ..train.log import LOG_NAME
    from .report import write_predict_report
    from .visualize import heat_top

    image_threshold = check_threshold(image_threshold, "--image-threshold")
    pixel_threshold = check_threshold(pixel_threshold, "--pixel-threshold")
    files = _expand(inputs)
    for path in files:  # a damaged file stops the run before any work (NOTE [fail at start] in data/_io.py)
        _header_size(path, "predict")
    detector = Detector(inference, tile=tile, smoothing_sigma=smoothing_sigma, bit_depth=bit_depth, register=register)
    if image_threshold is not None:
        detector.threshold = image_threshold
    if pixel_threshold is not None:
        detector.pixel_threshold = pixel_threshold
    if tile:
        for path in files:
            width, height = _header_size(path, "predict")
            check_tileable(height, width, inference.image_size, f"predict --tile: {path}")
    vmax = heat_top(detector.pixel_threshold,
                    (inference.checkpoint.score_stats or {}).get("image_max") or detector.threshold or 1.0)
    # A bar only after a second, so that an error on the first images stays the only line on stderr.
    with tqdm(total=len(files), desc="predict", unit="image", disable=not progress, leave=False, delay=1.0) as bar:
        rows = write_predictions(_ticking(_decide_each(detector, files), bar), Path(out_dir), names=output_names(files),
                                 vmax=vmax, image_threshold=detector.threshold, pixel_threshold=detector.pixel_threshold,
                                 checkpoint=str(inference.checkpoint.path))
    write_predict_report(Path(out_dir), rows, image_threshold=detector.threshold,
                         pixel_threshold=detector.pixel_threshold, checkpoint=str(inference.checkpoint.path),
                         log_path=Path(inference.checkpoint.path).parent / LOG_NAME)
    return rows


def _ticking(items: Iterable[tuple], bar) -> Iterable[tuple]:
    """``items``, ticking ``bar`` once an item has been consumed (decided and written), not when it was read."""
    for item in items:
        yield item
        bar.update(1)


def _decide_each(detector, files: Iterable[Path]) -> Iterable[tuple]:
    """``(prediction, pixels)`` per file, ``detector.batch_size`` files at a time (one at a time when tiled,
    so that progress follows each large image); each file is decoded once."""
    chunk: list = []
    chunk_size = 1 if detector.tile else detector.batch_size

    def flush() -> Iterable[tuple]:
        predictions = detector([image for _, image in chunk])
        for (name, image), prediction in zip(chunk, predictions):
            prediction.path = name
            yield prediction, np.asarray(image)
        chunk.clear()

    for path in files:
        chunk.append((str(path), load_rgb(Path(path), "predict", detector.bit_depth)))
        if len(chunk) == chunk_size:
            yield from flush()
    if chunk:
        yield from flush()


def _expand(inputs: Iterable[str | Path]) -> List[Path]:
    """Image files given directly, and the images of folders given, in order."""
    files: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(list_images(item, "predict", "pass image files or a folder of images."))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder.")
    if not files:
        raise ValueError("predict: no input images given.")
    return files
