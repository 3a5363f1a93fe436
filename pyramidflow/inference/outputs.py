"""The prediction files: what an inspection line ships for every image.

:func:`write_predictions` writes what ``pyramidflow predict`` promises for every image:
``masks/<name>.png``, ``maps/<name>.png``, the overlay with the predicted outline, and
``predictions.json`` / ``predictions.csv`` (the regions come from :mod:`.regions`);
:func:`output_names` gives every input its own ``<name>``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .._utils import atomic_write, write_text_atomic
from .visualize import colorize, overlay_panel, save_panel

__all__ = ["output_names", "write_predictions", "CSV_COLUMNS"]

CSV_COLUMNS = ("path", "score", "is_anomalous", "num_regions", "defect_area", "largest_region_bbox",
               "image_threshold", "pixel_threshold", "mask", "map", "overlay")
_OUTPUTS = ("mask", "map", "overlay")  # the per-image files, each in a folder named after it plus "s"
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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
            :class:`pyramidflow.inference.detector.Prediction` (with ``path`` set) and its ``(H, W, 3)`` uint8
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

    Raises:
        KeyboardInterrupt: Ctrl-C (or SIGTERM under the command line) arrived; the prediction files hold
            the images finished before it, and a note on the exception says how many.
    """
    out_dir = Path(out_dir)
    rows: list[dict] = []
    try:
        for (prediction, image), name in zip(decided, names):
            files = {kind: f"{kind}s/{name}.png" for kind in _OUTPUTS}
            mask = prediction.mask
            save_panel(Image.fromarray(mask.astype(np.uint8) * 255), out_dir / files["mask"])
            save_panel(Image.fromarray(colorize(prediction.anomaly_map, 0.0, vmax)), out_dir / files["map"])
            verdict = "ANOMALOUS" if prediction.is_anomalous else "good"
            panel = overlay_panel(image, prediction.anomaly_map, vmin=0.0, vmax=vmax, predicted=mask,
                                  threshold=pixel_threshold, is_anomalous=bool(prediction.is_anomalous),
                                  title=f"{name}  score {prediction.score:.3g}  {verdict}, {len(prediction.regions)} region(s)")
            save_panel(panel, out_dir / files["overlay"])
            rows.append({**_summary(prediction), **files})
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM under the command line: keep what is finished
        from ..train.interrupts import add_note, describe

        if rows:
            _write_tables(rows, out_dir, image_threshold, pixel_threshold, checkpoint)
            kept = (f"the {len(rows)} finished are in {out_dir / 'predictions.json'} and predictions.csv; "
                    f"predict the others again")
        else:
            kept = "no image was finished, no prediction file written"
        add_note(interrupt, f"predict: {describe(interrupt)} after {len(rows)} of {len(names)} images; {kept}.")
        raise
    _write_tables(rows, out_dir, image_threshold, pixel_threshold, checkpoint)
    return rows


def _write_tables(rows: list[dict], out_dir: Path, image_threshold: float, pixel_threshold: float,
                  checkpoint: str) -> None:
    """``predictions.json`` and ``predictions.csv`` of ``rows`` (atomically: a stop leaves the old file or the new)."""
    report = {"images": rows, "image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
              "checkpoint": checkpoint}
    write_text_atomic(out_dir / "predictions.json", json.dumps(report, indent=2) + "\n")
    with atomic_write(out_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            regions = row["regions"]
            largest = max(regions, key=lambda r: r["area"])["bbox"] if regions else ""
            writer.writerow([_csv_text(row["path"]), f"{row['score']:.6g}", int(row["is_anomalous"]), len(regions),
                             sum(r["area"] for r in regions), " ".join(map(str, largest)),
                             f"{image_threshold:.6g}", f"{pixel_threshold:.6g}",
                             *(_csv_text(row[kind]) for kind in _OUTPUTS)])
