"""The prediction files: what an inspection line ships for every image.

:func:`write_predictions` writes what ``pyramidflow predict`` promises for every image:
``masks/<name>.png``, ``maps/<name>.png``, the overlay with the predicted outline, and
``predictions.json`` / ``predictions.csv`` (the regions come from :mod:`.regions`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from .._utils import atomic_write, write_text_atomic
from .visualize import colorize, overlay_panel, save_panel

__all__ = ["write_predictions", "CSV_COLUMNS"]

CSV_COLUMNS = ("path", "score", "is_anomalous", "num_regions", "defect_area", "largest_region_bbox",
               "image_threshold", "pixel_threshold")


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
    vmax: float,
    image_threshold: float,
    pixel_threshold: float,
    checkpoint: str,
) -> list[dict]:
    """Write masks, heat maps, overlays, ``predictions.json`` and ``predictions.csv`` under ``out_dir``.

    Args:
        decided: ``(prediction, image)`` pairs, consumed one at a time: a
            :class:`pyramidflow.inference.detector.Prediction` (with ``path`` set) and its ``(H, W, 3)`` uint8
            image at the map's resolution.
        out_dir: output folder (created if needed).
        vmax: top of the heat-map colour range (the bottom is 0).
        image_threshold, pixel_threshold: the thresholds used, recorded in the outputs.
        checkpoint: the checkpoint's path, recorded in ``predictions.json``.

    Returns:
        One ``{"path", "score", "is_anomalous", "regions"}`` dict per image.
    """
    out_dir = Path(out_dir)
    rows = []
    for prediction, image in decided:
        name = Path(prediction.path).stem
        mask = prediction.mask
        save_panel(Image.fromarray(mask.astype(np.uint8) * 255), out_dir / "masks" / f"{name}.png")
        save_panel(Image.fromarray(colorize(prediction.anomaly_map, 0.0, vmax)), out_dir / "maps" / f"{name}.png")
        verdict = "ANOMALOUS" if prediction.is_anomalous else "good"
        panel = overlay_panel(image, prediction.anomaly_map, vmin=0.0, vmax=vmax, predicted=mask,
                              title=f"{name}  score {prediction.score:.3g}  {verdict}, {len(prediction.regions)} region(s)")
        save_panel(panel, out_dir / "overlays" / f"{name}.png")
        rows.append(_summary(prediction))
    report = {"images": rows, "image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
              "checkpoint": checkpoint}
    write_text_atomic(out_dir / "predictions.json", json.dumps(report, indent=2) + "\n")
    with atomic_write(out_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            regions = row["regions"]
            largest = max(regions, key=lambda r: r["area"])["bbox"] if regions else ""
            writer.writerow([row["path"], f"{row['score']:.6g}", int(row["is_anomalous"]), len(regions),
                             sum(r["area"] for r in regions), " ".join(map(str, largest)),
                             f"{image_threshold:.6g}", f"{pixel_threshold:.6g}"])
    return rows
