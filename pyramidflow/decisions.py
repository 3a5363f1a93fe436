"""From an anomaly map to what an inspection line ships: a yes/no, a binary mask and its defect regions.

:func:`find_regions` turns a binary mask into connected regions (8-connectivity, as the metrics use)
with a bounding box, an area and a peak score each. :func:`write_predictions` writes what
``pyramidflow predict`` promises for every image: ``masks/<name>.png``, ``maps/<name>.png``, the
overlay with the predicted outline, and ``predictions.json`` / ``predictions.csv``; :func:`output_names`
gives every input its own ``<name>``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .visualize import colorize, overlay_panel, save_panel

__all__ = ["find_regions", "output_names", "write_predictions", "CSV_COLUMNS"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=np.int8)
CSV_COLUMNS = ("path", "score", "is_anomalous", "num_regions", "defect_area", "largest_region_bbox",
               "image_threshold", "pixel_threshold", "mask", "map", "overlay")
_OUTPUTS = ("mask", "map", "overlay")  # the per-image files, each in a folder named after it plus "s"
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def find_regions(mask: np.ndarray, anomaly_map: np.ndarray) -> list[dict]:
    """Connected regions of a binary ``(H, W)`` mask, largest peak first.

    Each region is ``{"bbox": [x0, y0, x1, y1], "area": pixels, "peak": highest map value}``, the box
    in pixel coordinates with exclusive ends (``image[y0:y1, x0:x1]`` crops it).

    Example:
        >>> mask = np.zeros((6, 6), bool); mask[1:3, 1:4] = True; mask[5, 5] = True
        >>> values = np.arange(36.0).reshape(6, 6)
        >>> find_regions(mask, values)
        [{'bbox': [5, 5, 6, 6], 'area': 1, 'peak': 35.0}, {'bbox': [1, 1, 4, 3], 'area': 6, 'peak': 15.0}]
    """
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    peaks = ndimage.maximum(np.asarray(anomaly_map, dtype=np.float64), labels, index)
    regions = []
    for box, area, peak in zip(ndimage.find_objects(labels), areas, peaks):
        rows, cols = box
        regions.append({"bbox": [int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)],
                        "area": int(area), "peak": float(peak)})
    return sorted(regions, key=lambda region: -region["peak"])


def output_names(paths: Sequence[str | Path]) -> list[str]:
    """One output name per input file, unique and stable: its path under the inputs' common folder.

    ``crack/000.png`` and ``good/000.png`` become ``crack/000`` and ``good/000`` (files of one folder
    keep their bare stems); two inputs that would still share a name (``a.png`` and ``a.bmp``, names
    that differ only in case, one file given twice) keep their extension, then get ``~2``, ``~3``, ...
    in input order. A name is a ``/``-separated relative path without ``.`` or ``..`` parts.

    Example:
        >>> output_names(["in/crack/000.png", "in/good/000.png", "in/good/000.bmp"])
        ['crack/000', 'good/000.png', 'good/000.bmp']
    """
    files = [Path(os.path.abspath(p)) for p in paths]
    if not files:
        return []
    root = Path(os.path.commonpath([f.parent for f in files]))
    relative = [f.relative_to(root) for f in files]
    stems = [(r.parent / r.stem).as_posix() if r.stem not in ("", ".", "..") else r.as_posix() for r in relative]
    counts: dict = {}
    for stem in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    names, taken = [], set()
    for stem, rel in zip(stems, relative):
        name = stem if counts[stem.lower()] == 1 else rel.as_posix()
        unique, n = name, 1
        while unique.lower() in taken:  # lower case: case-insensitive file systems would merge them
            n += 1
            unique = f"{name}~{n}"
        taken.add(unique.lower())
        names.append(unique)
    return names


def _csv_text(value: str) -> str:
    """A text cell a spreadsheet shows as text: a leading formula character gets a ``'`` before it."""
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


def _summary(prediction: Any) -> dict:
    return {
        "path": prediction.path,
        "score": float(prediction.score),
        "is_anomalous": bool(prediction.is_anomalous),
        "regions": prediction.regions,
    }


def write_predictions(
    decided: Iterable[tuple[Any, np.ndarray]],
    out_dir: Path,
    *,
    names: Sequence[str],
    vmax: float,
    image_threshold: float,
    pixel_threshold: float,
    checkpoint: str,
) -> list[dict]:
    """Write masks, heat maps, overlays, ``predictions.json`` and ``predictions.csv`` under ``out_dir``.

    Args:
        decided: ``(prediction, image)`` pairs, consumed one at a time: a
            :class:`pyramidflow.detector.Prediction` (with ``path`` set) and its ``(H, W, 3)`` uint8
            image at the map's resolution.
        out_dir: output folder (created if needed).
        names: the output name of each image, in order (:func:`output_names`): its files are
            ``masks/<name>.png``, ``maps/<name>.png`` and ``overlays/<name>.png``.
        vmax: top of the heat-map colour range (the bottom is 0).
        image_threshold, pixel_threshold: the thresholds used, recorded in the outputs.
        checkpoint: the checkpoint's path, recorded in ``predictions.json``.

    Returns:
        One ``{"path", "score", "is_anomalous", "regions", "mask", "map", "overlay"}`` dict per image (the
        last three: the written files, relative to ``out_dir``).
    """
    out_dir = Path(out_dir)
    rows = []
    for (prediction, image), name in zip(decided, names):
        files = {kind: f"{kind}s/{name}.png" for kind in _OUTPUTS}
        mask = prediction.mask
        save_panel(Image.fromarray(mask.astype(np.uint8) * 255), out_dir / files["mask"])
        save_panel(Image.fromarray(colorize(prediction.anomaly_map, 0.0, vmax)), out_dir / files["map"])
        verdict = "ANOMALOUS" if prediction.is_anomalous else "good"
        panel = overlay_panel(image, prediction.anomaly_map, vmin=0.0, vmax=vmax, predicted=mask,
                              title=f"{name}  score {prediction.score:.3g}  {verdict}, {len(prediction.regions)} region(s)")
        save_panel(panel, out_dir / files["overlay"])
        rows.append({**_summary(prediction), **files})
    report = {"images": rows, "image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
              "checkpoint": checkpoint}
    tmp = out_dir / "predictions.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out_dir / "predictions.json")
    with open(out_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            regions = row["regions"]
            largest = max(regions, key=lambda r: r["area"])["bbox"] if regions else ""
            writer.writerow([_csv_text(row["path"]), f"{row['score']:.6g}", int(row["is_anomalous"]), len(regions),
                             sum(r["area"] for r in regions), " ".join(map(str, largest)),
                             f"{image_threshold:.6g}", f"{pixel_threshold:.6g}",
                             *(_csv_text(row[kind]) for kind in _OUTPUTS)])
    return rows
