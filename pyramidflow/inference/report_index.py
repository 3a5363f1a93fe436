"""One page over several evaluations (the demo's categories): each one's headline figures and a link to its page.

``write_index_report(out_dir, folders)`` writes ``out_dir/report.html`` for folders that each hold an
evaluation's ``metrics.json`` and ``report.html`` (:mod:`pyramidflow.inference.report`): per folder a
card with the pixel AUROC, AUPRO, image AUROC and mask F1 read from its ``metrics.json``, and as
thumbnail the overlay its own page shows first (a false alarm or a miss if there is one, else the
highest score), which is already on disk. Plain HTML and CSS with relative links: the page opens from
disk with no network, as long as the folders stay beside it. Every figure cell carries its key and
exact value as ``data-key`` / ``data-value``, and its row the ``metrics.json`` it came from as
``data-source``, so a test can check the page against the files.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Sequence
from urllib.parse import quote

from .._utils import write_text_atomic
from .report import FALSE_ALARM, FOUND, PASSED, REPORT_NAME, _cell, _e, _page, eval_gallery, gallery_order

__all__ = ["HEADLINE", "write_index_report"]

# The figures on each card: (label, metrics.json key, format).
HEADLINE = (("pixel AUROC", "pixel_auroc", ".4f"), ("AUPRO@0.3", "aupro", ".4f"), ("image AUROC", "image_auroc", ".4f"),
            ("mask F1 (pixels, at the stored thresholds)", "pixel_f1", ".4f"))


def _card(out_dir: Path, folder: Path) -> str:
    metrics_path = folder / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"write_index_report: cannot read {metrics_path} ({error}); evaluate that folder first "
                         "(`pyramidflow eval --out ...`), or leave it out.") from None
    link = PurePosixPath(folder.resolve().relative_to(out_dir.resolve()).as_posix())
    try:
        items = eval_gallery(metrics["images"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"write_index_report: {metrics_path} lists no test images (no {error} in its 'images'); "
                         "evaluate that folder again with this version (`pyramidflow eval`).") from None
    first = items[gallery_order(items)[0]]
    said = f"{first.name}, score {first.score:.4g}, {first.outcome}"
    false_alarms = sum(item.outcome == FALSE_ALARM for item in items)
    found = sum(item.outcome == FOUND for item in items)
    good = sum(item.outcome in (FALSE_ALARM, PASSED) for item in items)
    rows = "".join(f"<tr><td>{_e(label)}</td>{_cell(metrics, [key], spec)}</tr>" for label, key, spec in HEADLINE)
    page = _e(quote((link / REPORT_NAME).as_posix()))
    name = metrics.get("category") or folder.name
    return (f"<section class='run' data-name='{_e(name)}'><h2><a href='{page}'>{_e(name)}</a></h2>"
            f"<table data-source='{_e((link / 'metrics.json').as_posix())}'><tbody>{rows}</tbody></table>"
            f"<a href='{page}'><img src='{_e(quote((link / first.overlay).as_posix()))}' alt='{_e(first.name)}'></a>"
            f"<p class='legend'>false alarms {false_alarms}/{good}, defective images found {found}/{len(items) - good}; "
            f"first in its gallery: {_e(said)}; all {len(items)} test images on <a href='{page}'>its page</a></p>"
            "</section>")


def write_index_report(out_dir: Path, folders: Sequence[Path], *, title: str = "pyramidflow evaluations") -> Path:
    """Write ``out_dir/report.html``: a card per evaluation folder, linking to its own ``report.html``.

    Args:
        out_dir: where the page goes; every folder must lie under it (the links are relative).
        folders: evaluation folders, each with ``metrics.json`` and ``report.html``, in the page's order.
        title: the page's heading.

    Returns:
        The page's path.

    Raises:
        ValueError: a folder is not strictly under ``out_dir``, or its ``metrics.json`` is missing or unreadable.
    """
    out_dir = Path(out_dir)
    for folder in folders:
        where = Path(folder).resolve()
        if where == out_dir.resolve() or not where.is_relative_to(out_dir.resolve()):
            raise ValueError(f"write_index_report: {folder} is not under {out_dir}; the page links to it by a "
                             f"relative path (and would replace its own {REPORT_NAME} in it), so put the page in "
                             "a folder above the evaluations.")
    cards = "".join(_card(out_dir, Path(folder)) for folder in folders)
    subtitle = (f"{len(folders)} evaluations; each card's figures are its metrics.json's, its title and picture "
                "open its page")
    path = out_dir / REPORT_NAME
    write_text_atomic(path, _page(title, subtitle, f"<div class='runs' id='runs'>{cards}</div>"))
    return path
