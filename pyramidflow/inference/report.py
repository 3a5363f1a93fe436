"""``report.html``: one page a person takes in at a glance, written beside ``metrics.json`` or ``predictions.json``.

The page is plain HTML and CSS in one file that opens from disk with no network: the plots
(:mod:`pyramidflow.inference.plots`) are embedded as base64 SVGs, and the gallery shows the overlays
already written beside it by relative path. ``eval``'s page: the figures per defect type, the
decisions at the stored thresholds, the ROC and PRO curves, the score histogram with the image
threshold, the training loss from the run's ``train_log.jsonl``, and every test image, false alarms
and misses first (:func:`gallery_order`). ``predict``'s page: the same for unlabelled images, without
what needs labels. Every figure in a table cell carries its ``metrics.json`` key and exact value as
``data-key`` / ``data-value``, so a test (or a script) can check the page against the file.

The eval page's plots, its slow part (importing matplotlib, drawing), are drawn by :class:`EvalPlots`
in a second process while the evaluation goes on; :func:`write_eval_report` writes the page around them.
"""

from __future__ import annotations

import base64
import html
import json
import math
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence
from urllib.parse import quote

import numpy as np

from .._utils import write_text_atomic
from .plot_worker import PlotWorker

if TYPE_CHECKING:
    from .curves import PixelCurves

__all__ = ["REPORT_NAME", "GalleryItem", "outcome", "eval_gallery", "gallery_order", "read_losses", "EvalPlots",
           "write_eval_report", "write_predict_report"]

REPORT_NAME = "report.html"
FALSE_ALARM, MISSED, FOUND, PASSED = "false alarm", "missed", "found", "good"
_ERRORS_FIRST = (FALSE_ALARM, MISSED)  # the gallery's leading groups, in this order


@dataclass
class GalleryItem:
    """One image of the gallery: its overlay (relative to the page), score, decision and what to say of it.

    ``outcome`` is one of ``"false alarm"``, ``"missed"``, ``"found"``, ``"good"`` for a labelled image
    (:func:`outcome`), ``""`` for an unlabelled one.
    """

    name: str
    overlay: str
    score: float
    is_anomalous: bool
    outcome: str = ""
    detail: str = ""


def outcome(label: int, is_anomalous: bool) -> str:
    """What a decision was for an image of known ``label`` (1: defective): found, missed, false alarm or good."""
    if label == 1:
        return FOUND if is_anomalous else MISSED
    return FALSE_ALARM if is_anomalous else PASSED


def eval_gallery(images: Sequence[dict]) -> list[GalleryItem]:
    """The gallery items of an evaluation's ``metrics.json`` ``images`` rows, in the same order."""
    return [GalleryItem(row["name"], row["overlay"], row["score"], row["is_anomalous"],
                        outcome(row["label"], row["is_anomalous"]), row["defect_type"]) for row in images]


def gallery_order(items: Sequence[GalleryItem]) -> list[int]:
    """Indices of ``items`` in the gallery's order: false alarms, misses, then the rest; each by score, highest first.

    Example:
        >>> items = [GalleryItem("a", "", 0.9, True, FOUND), GalleryItem("b", "", 0.2, False, MISSED),
        ...          GalleryItem("c", "", 0.5, True, FALSE_ALARM), GalleryItem("d", "", 0.1, False, PASSED)]
        >>> gallery_order(items)
        [2, 1, 0, 3]
    """
    def key(i: int) -> tuple:
        group = _ERRORS_FIRST.index(items[i].outcome) if items[i].outcome in _ERRORS_FIRST else len(_ERRORS_FIRST)
        return group, -items[i].score

    return sorted(range(len(items)), key=key)


def read_losses(path: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(steps, losses)`` of a run log (:mod:`pyramidflow.train.log`); None when it is absent or holds none.

    A line that is not a record with a finite step and loss (a torn last line) is left out: the page
    shows what can be read and never stops the evaluation.
    """
    if not path.is_file():
        return None
    points = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            step, loss = float(record["step"]), float(record["loss"])
        except (ValueError, TypeError, KeyError):
            continue
        if math.isfinite(step) and math.isfinite(loss):
            points.append((step, loss))
    if not points:
        return None
    steps, losses = np.array(points).T
    return steps, losses


# -- page pieces ---------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
header{background:#1d2b3a;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c8d1dc;font-size:13px}main{padding:16px 24px;max-width:1700px}
h2{font-size:16px;margin:22px 0 8px}.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tile{background:#fff;border-radius:6px;padding:8px 14px;box-shadow:0 1px 2px #0002;min-width:120px}
.tile b{display:block;font-size:22px}.tile span{color:#555;font-size:12px}
.tile.bad b{color:#c92a2a}.tile.ok b{color:#2b8a3e}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:4px 12px;border-bottom:1px solid #e3e5e8;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#eef0f3;font-weight:600}.tables{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px;max-width:1700px}
.plots figure{margin:0;background:#fff;padding:6px;border-radius:6px;box-shadow:0 1px 2px #0002}
.plots img{display:block;width:100%}
.note{height:100%;min-height:220px;display:flex;align-items:center;justify-content:center;text-align:center;color:#666;
padding:0 16px;box-sizing:border-box}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.card{margin:0;background:#fff;border-radius:6px;box-shadow:0 1px 2px #0002;border-left:6px solid #adb5bd;padding:6px}
.card img{width:100%;display:block}.card figcaption{padding:4px 2px 0;font-size:13px}
.card.false-alarm,.card.missed{border-left-color:#e8590c}.card.found{border-left-color:#c92a2a}
.card.good{border-left-color:#2b8a3e}.badge{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;
font-size:12px;font-weight:600}.badge.anomalous{background:#c92a2a}.badge.ok{background:#2b8a3e}
.outcome{font-weight:600;color:#e8590c}.legend{color:#555;font-size:13px;margin:0 0 8px}
.runs{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:12px}
.run{background:#fff;border-radius:6px;box-shadow:0 1px 2px #0002;padding:8px 12px}.run h2{margin:4px 0 8px}
.run img{width:100%;display:block;margin:8px 0 4px}.run table{box-shadow:none;width:100%}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(svg: bytes) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")


def _cell(metrics: dict, key: Sequence[str], spec: str = ".4f") -> str:
    """A table cell with the figure at ``key`` (a path into ``metrics``), its key and exact value as data."""
    value = metrics
    for part in key:
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return "<td>&ndash;</td>"
    if isinstance(value, str):
        return f"<td>{_e(value)}</td>"
    return (f"<td data-key='{_e(json.dumps(list(key)))}' data-value='{_e(repr(float(value)))}'>"
            f"{format(value, spec)}</td>")


def _table(caption: str, header: Sequence[str], rows: Iterable[str], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return (f"<div><h2>{_e(caption)}</h2><table id='{table_id}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _plot(svg: bytes, alt: str) -> str:
    return f"<figure><img src='{_data_uri(svg)}' alt='{_e(alt)}'></figure>"


def _note(text: str) -> str:
    return f"<figure><div class='note'>{_e(text)}</div></figure>"


def _no_loss(log_path: Path) -> str:
    return _note(f"No training loss: the run log {log_path} is absent or holds no record "
                 "(the checkpoint was moved without its folder, or the log was deleted).")


def _loss_section(log_path: Path) -> str:
    from .plots import loss_plot

    losses = read_losses(log_path)
    return _no_loss(log_path) if losses is None else _plot(loss_plot(*losses), "training loss")


def _gallery(items: Sequence[GalleryItem]) -> str:
    cards = []
    for rank, i in enumerate(gallery_order(items), start=1):
        item = items[i]
        badge = ("<span class='badge anomalous'>ANOMALOUS</span>" if item.is_anomalous
                 else "<span class='badge ok'>GOOD</span>")
        said = f" <span class='outcome'>{_e(item.outcome)}</span>" if item.outcome in _ERRORS_FIRST else ""
        detail = f" &middot; {_e(item.detail)}" if item.detail else ""
        css = item.outcome.replace(" ", "-") if item.outcome else ("found" if item.is_anomalous else "good")
        cards.append(
            f"<figure class='card {css}' data-name='{_e(item.name)}' data-score='{_e(repr(float(item.score)))}' "
            f"data-outcome='{_e(item.outcome)}' data-anomalous='{int(item.is_anomalous)}'>"
            f"<img src='{_e(quote(item.overlay))}' alt='{_e(item.name)}'>"
            f"<figcaption>#{rank} <b>{_e(item.name)}</b> &middot; score {item.score:.4g} {badge}{said}{detail}"
            f"</figcaption></figure>"
        )
    return f"<div class='gallery' id='gallery'>{''.join(cards)}</div>"


def _page(title: str, subtitle: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head>"
            f"<body><header><h1>{_e(title)}</h1><p>{subtitle}</p></header><main>{body}</main></body></html>\n")


def _tile(value: str, label: str, css: str = "") -> str:
    return f"<div class='tile {css}'><b>{_e(value)}</b><span>{_e(label)}</span></div>"


_COLOUR_BAR = ("the colour bar runs from 0 to twice the pixel threshold, which is marked in its middle: purple to "
               "red is below it, orange to white above it.")
_LEGEND = ("Each panel: the image, its anomaly map and the map over the image; green: ground-truth outline, "
           "cyan: predicted defect mask; " + _COLOUR_BAR)
_PREDICT_LEGEND = ("Each panel: the image, its anomaly map and the map over the image; cyan: predicted defect mask; "
                   + _COLOUR_BAR)


# -- the two pages -------------------------------------------------------------------------------------

def _scores_and_labels(images: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([row["score"] for row in images], dtype=np.float64),
            np.array([row["label"] for row in images]))


def _curve_requests(metrics: dict, curves: PixelCurves, fpr_limit: float) -> list[tuple[str, tuple, str]]:
    """The ROC, PRO and histogram plots of an evaluation: ``(function of plots, its arguments, alt text)`` each."""
    from .curves import image_roc, thin

    scores, labels = _scores_and_labels(metrics["images"])
    return [
        ("roc_plot", ([(*thin(curves.fpr, curves.tpr), f"pixels (AUROC {metrics['pixel_auroc']:.4f})"),
                       (*image_roc(scores, labels), f"images (AUROC {metrics['image_auroc']:.4f})")],), "ROC curves"),
        ("pro_plot", (*thin(curves.fpr, curves.pro), metrics["aupro"], fpr_limit), "PRO curve"),
        ("score_histogram", (scores[labels == 0], scores[labels == 1], metrics["image_threshold"]),
         "image score histogram"),
    ]


class EvalPlots:
    """The eval page's four plots, drawn by a :class:`~pyramidflow.inference.plot_worker.PlotWorker` while eval goes on.

    Importing matplotlib and drawing the plots is most of what the page costs, a fixed cost (about 0.45 s
    of CPU, benchmarks/report_plot_cpu.py), which the worker's process does on a core eval leaves idle
    (plot_worker says why a process). The training loss is drawn from the start; :meth:`draw_curves`
    adds the ROC, PRO and histogram plots once the metrics are known, drawn while eval writes its
    overlays. Use it as a context manager, so that the worker ends when the evaluation fails
    (:func:`pyramidflow.inference.evaluate.evaluate` shows the use: started, ``draw_curves``, then
    :func:`write_eval_report`).
    """

    def __init__(self, log_path: Path, *, fpr_limit: float, worker: Optional[PlotWorker] = None) -> None:
        """``worker``: one started already (the command line starts it before importing torch), which this
        object then ends; default: one started here."""
        self.fpr_limit = fpr_limit
        self._worker = PlotWorker() if worker is None else worker
        losses = read_losses(Path(log_path))
        self._loss = _no_loss(Path(log_path)) if losses is None else self._worker.submit("loss_plot", *losses)
        self._curves: Optional[list[tuple[Future, str]]] = None

    def draw_curves(self, metrics: dict, curves: PixelCurves) -> None:
        """Start the ROC, PRO and histogram plots of ``metrics`` (what ``metrics.json`` holds, with its ``images``).

        ``curves``: the pixel curves behind ``metrics``' figures (:func:`pyramidflow.inference.curves.ranked_curves`
        of the pixels the metrics ranked); they are thinned to the points a plot shows here, so that
        little goes to the worker.
        """
        self._curves = [(self._worker.submit(function, *args), alt)
                        for function, args, alt in _curve_requests(metrics, curves, self.fpr_limit)]

    def figures(self) -> str:
        """The page's four figures, in order; waits for the worker and raises what a plot raised."""
        if self._curves is None:
            raise RuntimeError("EvalPlots.figures: call draw_curves(metrics, curves) first.")
        loss = self._loss if isinstance(self._loss, str) else _plot(self._loss.result(), "training loss")
        return "".join(_plot(future.result(), alt) for future, alt in self._curves) + loss

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> "EvalPlots":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_eval_report(out_dir: Path, metrics: dict, plots: EvalPlots) -> Path:
    """Write ``out_dir/report.html`` for an evaluation.

    Args:
        metrics: what ``metrics.json`` holds (:func:`pyramidflow.inference.evaluate.evaluate`), with its
            per-image ``images`` rows.
        plots: its plots, :meth:`EvalPlots.draw_curves` called with the same ``metrics``.

    Returns:
        The page's path.
    """
    fpr_limit = plots.fpr_limit
    images = metrics["images"]
    _, labels = _scores_and_labels(images)
    good, bad = int((labels == 0).sum()), int((labels == 1).sum())
    items = eval_gallery(images)
    false_alarms = sum(item.outcome == FALSE_ALARM for item in items)
    found = sum(item.outcome == FOUND for item in items)
    tiles = "".join([
        _tile(f"{metrics['image_auroc']:.4f}", "image AUROC"),
        _tile(f"{metrics['pixel_auroc']:.4f}", "pixel AUROC"),
        _tile(f"{metrics['aupro']:.4f}", f"AUPRO@{fpr_limit:g}"),
        _tile(f"{false_alarms}/{good}", "false alarms (good images flagged)", "bad" if false_alarms else "ok"),
        _tile(f"{found}/{bad}", "defective images found", "ok" if found == bad else "bad"),
    ])
    per_type = [f"<tr><td>all</td><td>{bad}</td>{_cell(metrics, ['pixel_auroc'])}{_cell(metrics, ['image_auroc'])}"
                f"{_cell(metrics, ['aupro'])}</tr>"]
    for kind in metrics["per_defect_type"]:
        row = ["per_defect_type", kind]
        per_type.append(f"<tr><td>{_e(kind)}</td>{_cell(metrics, row + ['count'], 'd')}"
                        f"{_cell(metrics, row + ['pixel_auroc'])}{_cell(metrics, row + ['image_auroc'])}"
                        "<td>&ndash;</td></tr>")
    decisions = [
        ("image threshold", "image_threshold", ".4g"), ("pixel threshold", "pixel_threshold", ".4g"),
        ("pixel rule", "pixel_rule", ""), ("thresholds from", "thresholds_from", ""),
        ("image precision", "image_precision", ".4f"), ("image recall", "image_recall", ".4f"),
        ("image F1", "image_f1", ".4f"), ("image false-positive rate", "image_fpr", ".4f"),
        ("pixel F1", "pixel_f1", ".4f"), ("pixel IoU", "pixel_iou", ".4f"),
        ("best pixel F1 (reads the test masks)", "best_pixel_f1_using_test_labels", ".4f"),
    ]
    body = (
        f"<div class='tiles'>{tiles}</div><div class='tables'>"
        + _table("Metrics per defect type", ["defect type", "images", "pixel AUROC", "image AUROC",
                                              f"AUPRO@{fpr_limit:g}"], per_type, "per-defect-type")
        + _table("Decisions at the stored thresholds", ["", "value"],
                 [f"<tr><td>{_e(name)}</td>{_cell(metrics, [key], spec)}</tr>" for name, key, spec in decisions],
                 "decisions")
        + "</div><h2>Curves</h2><div class='plots'>" + plots.figures()
        + f"</div><h2>Test images ({len(items)}): false alarms and misses first, then by score</h2>"
        + f"<p class='legend'>{_e(_LEGEND)}</p>" + _gallery(items)
    )
    subtitle = (f"{len(items)} test images ({bad} defective) &middot; checkpoint {_e(metrics['checkpoint'])} "
                f"(step {_e(metrics['checkpoint_step'])}) &middot; smoothing sigma {_e(metrics['smoothing_sigma'])}")
    title = f"pyramidflow evaluation: {metrics['category'] or 'test set'}"
    path = Path(out_dir) / REPORT_NAME
    write_text_atomic(path, _page(title, subtitle, body))
    return path


def write_predict_report(out_dir: Path, rows: Sequence[dict], *, image_threshold: float, pixel_threshold: float,
                         checkpoint: str, log_path: Path) -> Path:
    """Write ``out_dir/report.html`` for predictions: every image by score, its decision and regions.

    Args:
        rows: the rows of ``predictions.json`` (:func:`pyramidflow.inference.outputs.write_predictions`).
        image_threshold, pixel_threshold: the thresholds the decisions used.
        checkpoint: the checkpoint's path, shown in the header.
        log_path: the run's ``train_log.jsonl`` (the page says so when it is absent).

    Returns:
        The page's path.
    """
    from .plots import score_histogram

    scores = np.array([row["score"] for row in rows], dtype=np.float64)
    items = [GalleryItem(row["path"], row["overlay"], row["score"], row["is_anomalous"],
                         detail=_regions(row["regions"])) for row in rows]
    flagged = sum(item.is_anomalous for item in items)
    summary = {"image_threshold": image_threshold, "pixel_threshold": pixel_threshold}
    body = (
        "<div class='tiles'>" + _tile(f"{flagged}/{len(items)}", "images flagged anomalous", "bad" if flagged else "ok")
        + "</div><div class='tables'>"
        + _table("Thresholds", ["", "value"], [f"<tr><td>{name}</td>{_cell(summary, [key], '.4g')}</tr>"
                                               for name, key in (("image threshold", "image_threshold"),
                                                                 ("pixel threshold", "pixel_threshold"))], "thresholds")
        + "</div><h2>Scores</h2><div class='plots'>"
        + _plot(score_histogram(scores, None, image_threshold), "image score histogram") + _loss_section(log_path)
        + f"</div><h2>Images ({len(items)}), by score</h2><p class='legend'>{_e(_PREDICT_LEGEND)}</p>" + _gallery(items)
    )
    path = Path(out_dir) / REPORT_NAME
    write_text_atomic(path, _page("pyramidflow predictions", f"checkpoint {_e(checkpoint)}", body))
    return path


def _regions(regions: Sequence[dict]) -> str:
    if not regions:
        return "no region"
    return f"{len(regions)} region(s), largest {max(r['area'] for r in regions)} px"
