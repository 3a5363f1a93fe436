"""report.html of eval and predict, opened in a real headless Chromium; the curves, the plot process, the colour bar."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from pyramidflow.cli import _early_plot_worker, main
from pyramidflow.data import synthetic
from pyramidflow.inference import plots
from pyramidflow.inference.curves import PixelCurves, pixel_curves, ranked_curves, thin
from pyramidflow.inference.plot_worker import PlotWorker
from pyramidflow.inference.report import (FALSE_ALARM, MISSED, REPORT_NAME, EvalPlots, eval_gallery, gallery_order,
                                          outcome, read_losses)
from pyramidflow.inference.report_index import HEADLINE, write_index_report
from pyramidflow.inference.visualize import overlay_panel
from pyramidflow.metrics import _metrics_and_ranking, aupro, compute_metrics, pixel_auroc
from pyramidflow.train.log import LOG_NAME

SIZE = 64
SMALL = ["--channels", "4", "--kernel-size", "3", "--stacks", "2", "--levels", "3"]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")  # Debian's packages
# Every image decoded: a missing file or a broken data URI leaves naturalWidth at 0.
ALL_IMAGES_LOADED = "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium; skipped where absent, unless PYRAMIDFLOW_REQUIRE_BROWSER=1 (CI)."""
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        reason = f"needs headless Chromium: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("PYRAMIDFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PYRAMIDFLOW_REQUIRE_BROWSER=1 but the report test {reason}")
        pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="pyramidflow-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=1, size=SIZE, categories=("nut",),
                              num_train=8, num_test=2)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "4", "--device", "cpu", *SMALL]) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def evaluated(trained, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--checkpoint", str(trained), "--data", str(data_root), "--category", "nut",
                 "--out", str(out), "--device", "cpu"]) == 0
    return out


def _open(browser, page: Path) -> None:
    browser.get(page.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"


def _loaded_from_disk_only(browser) -> None:
    """Every image decoded, and nothing fetched but the page's own files and data URIs."""
    assert browser.execute_script("return document.images.length") > 0
    assert browser.execute_script(ALL_IMAGES_LOADED)
    sources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(s.startswith(("file:", "data:")) for s in sources), sources


def _lookup(metrics: dict, key: list):
    for part in key:
        metrics = metrics[part]
    return metrics


def test_eval_report_loads_every_image_and_shows_the_figures_of_metrics_json(browser, evaluated):
    _check_eval_page(browser, evaluated)


@pytest.mark.slow
def test_demo_writes_a_report_per_category_that_renders(browser, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--size", "32", "--device", "cpu"]) == 0
    assert f"open {tmp_path / REPORT_NAME} to see them" in capsys.readouterr().out
    for category in synthetic.CATEGORIES:
        _check_eval_page(browser, tmp_path / category)
    _check_index_page(browser, tmp_path, [tmp_path / category for category in synthetic.CATEGORIES])


def test_index_page_links_each_evaluation_with_the_figures_of_its_metrics_json(browser, evaluated, tmp_path):
    for name in ("first", "second"):
        shutil.copytree(evaluated, tmp_path / "runs" / name)
    folders = [tmp_path / "runs" / "second", tmp_path / "runs" / "first"]
    assert write_index_report(tmp_path, folders) == tmp_path / REPORT_NAME
    _check_index_page(browser, tmp_path, folders)


def test_index_page_refuses_a_folder_it_cannot_link_or_read(evaluated, tmp_path):
    for folder in (evaluated, tmp_path):  # elsewhere, or the folder whose own page the index would replace
        with pytest.raises(ValueError, match="is not under"):
            write_index_report(tmp_path, [folder])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="metrics.json"):
        write_index_report(tmp_path, [tmp_path / "empty"])


def _check_index_page(browser, root: Path, folders: list) -> None:
    """``root/report.html`` shows one card per evaluation folder, in order, whose figures, links and picture
    are those of the folder's ``metrics.json`` and ``report.html``."""
    page = root / REPORT_NAME
    _open(browser, page)
    _loaded_from_disk_only(browser)
    links = browser.execute_script("return Array.from(document.links).map(a => a.href)")
    assert links
    for link in links:  # every link is a file beside the page
        assert urlparse(link).scheme == "file" and Path(unquote(urlparse(link).path)).is_file(), link
    cards = browser.execute_script(
        "return Array.from(document.querySelectorAll('#runs section')).map(s => [s.querySelector('h2 a').href, "
        "s.querySelector('table').dataset.source, s.querySelector('img').src, "
        "Array.from(s.querySelectorAll('td[data-key]')).map(c => [c.dataset.key, c.dataset.value, c.textContent])])")
    assert len(cards) == len(folders)
    for (href, source, image, cells), folder in zip(cards, folders):
        assert Path(unquote(urlparse(href).path)) == (folder / REPORT_NAME).resolve()
        metrics = json.loads((root / source).read_text())
        assert (root / source).resolve() == (folder / "metrics.json").resolve()
        items = eval_gallery(metrics["images"])
        assert Path(unquote(urlparse(image).path)) == (folder / items[gallery_order(items)[0]].overlay).resolve()
        assert [json.loads(key) for key, _, _ in cells] == [[key] for _, key, _ in HEADLINE]
        for key, value, text in cells:
            figure = _lookup(metrics, json.loads(key))
            assert float(value) == figure and abs(float(text) - figure) <= 5e-5, (key, text, figure)


def test_eval_plots_raise_what_a_plot_raised_and_end_their_process(tmp_path):
    metrics = {"images": [{"score": 0.1, "label": 0}, {"score": 0.2, "label": 1}], "pixel_auroc": 0.5,
               "image_auroc": 0.5, "aupro": 0.5, "image_threshold": 0.15}
    with EvalPlots(tmp_path / LOG_NAME, fpr_limit=0.3) as plots:
        with pytest.raises(RuntimeError, match="draw_curves"):
            plots.figures()
        broken = PixelCurves(fpr=np.linspace(0, 1, 5), tpr=np.linspace(0, 1, 4), pro=np.linspace(0, 1, 5))
        with pytest.raises(ValueError, match="same shape"):  # 5 false- and 4 true-positive rates
            plots.draw_curves(metrics, broken)
    assert plots._worker._process.poll() is not None
    with PlotWorker() as worker:
        drawn = worker.submit("roc_plot", [(np.linspace(0, 1, 5), np.linspace(0, 1, 4), "broken")])
        with pytest.raises(ValueError, match="same first dimension"):  # raised by matplotlib in the child
            drawn.result()
        assert worker._process.poll() is None  # an error in a plot leaves the process serving
    assert worker._process.poll() is not None


@pytest.mark.parametrize("executable", [sys.executable, ""], ids=["child process", "no interpreter to start"])
def test_plot_worker_draws_the_plots_of_this_process(executable, monkeypatch):
    monkeypatch.setattr(sys, "executable", executable)
    steps, losses = np.arange(1.0, 31.0), np.linspace(2.0, 0.5, 30)
    with PlotWorker() as worker:
        assert (worker._process is None) == (executable == "")
        assert worker.submit("loss_plot", steps, losses).result() == plots.loss_plot(steps, losses)


def test_the_eval_page_leaves_matplotlib_out_of_evals_process(tmp_path):
    """Its plots are drawn in the worker's process: this one imports no matplotlib (plot_worker says why)."""
    script = f"""
import sys
import numpy as np
from pyramidflow.inference import plots
from pyramidflow.inference.curves import PixelCurves
from pyramidflow.inference.report import EvalPlots
metrics = {{"images": [{{"score": 0.1, "label": 0}}, {{"score": 0.2, "label": 1}}], "pixel_auroc": 0.5,
           "image_auroc": 0.5, "aupro": 0.5, "image_threshold": 0.15}}
line = np.linspace(0, 1, 50)
with EvalPlots({str(tmp_path / LOG_NAME)!r}, fpr_limit=0.3) as plots:
    plots.draw_curves(metrics, PixelCurves(fpr=line, tpr=line, pro=line))
    assert plots.figures().count("<img") == 3 and "No training loss" in plots.figures()
assert "matplotlib" not in sys.modules, "matplotlib imported in eval's process"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_only_an_eval_that_writes_the_page_starts_its_plot_process_early():
    for argv in ([], ["train", "--data", "d"], ["eval", "--no-report"], ["eval", "-h"], ["predict", "eval"]):
        assert _early_plot_worker(argv) is None, argv
    with _early_plot_worker(["eval", "--checkpoint", "c.pt", "--data", "d"]) as worker:
        assert isinstance(worker, PlotWorker) and worker._process.poll() is None


def test_eval_without_report_writes_metrics_and_overlays_only(trained, data_root, tmp_path):
    assert main(["eval", "--checkpoint", str(trained), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path), "--device", "cpu", "--no-report"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert not (tmp_path / REPORT_NAME).exists()
    assert all((tmp_path / row["overlay"]).is_file() for row in metrics["images"])


def _check_eval_page(browser, folder: Path) -> None:
    """The page in ``folder`` loads everything from disk; its tables and gallery say what ``metrics.json`` says."""
    metrics = json.loads((folder / "metrics.json").read_text())
    _open(browser, folder / REPORT_NAME)
    _loaded_from_disk_only(browser)
    # 4 plots (ROC, PRO, histogram, loss: the run log is beside the checkpoint) and one panel per test image.
    assert browser.execute_script("return document.images.length") == 4 + metrics["num_images"]

    cells = browser.execute_script("return Array.from(document.querySelectorAll('td[data-key]'))"
                                   ".map(c => [c.dataset.key, c.dataset.value, c.textContent])")
    keys = {tuple(json.loads(key)) for key, _, _ in cells}
    expected = {("pixel_auroc",), ("image_auroc",), ("aupro",), ("image_threshold",), ("image_f1",), ("pixel_iou",)}
    expected |= {("per_defect_type", kind, "image_auroc") for kind in synthetic.DEFECT_TYPES}
    assert expected <= keys, expected - keys
    for key, value, text in cells:
        figure = _lookup(metrics, json.loads(key))
        assert float(value) == figure, key
        # shown with 4 decimals or 4 significant digits
        assert abs(float(text) - figure) <= max(5e-5, 5e-4 * abs(figure)), (key, text, figure)

    cards = browser.execute_script(
        "return Array.from(document.querySelectorAll('#gallery figure')).map(c => "
        "[c.dataset.name, Number(c.dataset.score), c.dataset.outcome, c.querySelector('img').getAttribute('src')])")
    rows = {row["name"]: row for row in metrics["images"]}
    assert sorted(name for name, *_ in cards) == sorted(rows)
    for name, score, said, src in cards:
        row = rows[name]
        assert score == row["score"] and src == row["overlay"]
        assert said == outcome(row["label"], row["is_anomalous"])
        assert row["is_anomalous"] == (row["score"] > metrics["image_threshold"])
    # False alarms, then misses, then the rest; by score, highest first, within each.
    group = [[FALSE_ALARM, MISSED].index(said) if said in (FALSE_ALARM, MISSED) else 2 for _, _, said, _ in cards]
    assert group == sorted(group), group
    for g in set(group):
        scores = [score for (_, score, _, _), h in zip(cards, group) if h == g]
        assert scores == sorted(scores, reverse=True)


def test_eval_report_says_when_the_training_log_is_absent(browser, trained, data_root, tmp_path):
    moved = tmp_path / "moved" / "checkpoint.pt"
    moved.parent.mkdir()
    shutil.copy(trained, moved)  # without its folder's train_log.jsonl
    assert main(["eval", "--checkpoint", str(moved), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    _open(browser, tmp_path / "eval" / REPORT_NAME)
    _loaded_from_disk_only(browser)
    assert "No training loss" in browser.find_element("tag name", "body").text
    assert str(moved.parent / LOG_NAME) in browser.find_element("tag name", "body").text


def test_predict_report_lists_every_image_by_score_with_its_decision(browser, trained, data_root, tmp_path):
    images = data_root / "nut" / "test"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(tmp_path), str(images / "spot"),
                 str(images / "good"), "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "predictions.json").read_text())["images"]
    _open(browser, tmp_path / REPORT_NAME)
    _loaded_from_disk_only(browser)
    cards = browser.execute_script(
        "return Array.from(document.querySelectorAll('#gallery figure')).map(c => "
        "[c.dataset.name, Number(c.dataset.score), c.dataset.anomalous, c.textContent])")
    assert [name for name, *_ in cards] == [row["path"] for row in sorted(rows, key=lambda r: -r["score"])]
    by_path = {row["path"]: row for row in rows}
    for name, score, flagged, text in cards:
        assert score == by_path[name]["score"] and flagged == str(int(by_path[name]["is_anomalous"]))
        assert ("ANOMALOUS" if by_path[name]["is_anomalous"] else "GOOD") in text


def test_the_curves_are_the_ones_the_metrics_integrate():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 37, 53))
    masks[0, 5:12, 7:20] = 1
    masks[1, 20:30, 30:33] = 1
    maps = rng.random(masks.shape) + 0.7 * masks
    curves = pixel_curves(maps, masks)
    area = lambda x, y: float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))  # noqa: E731
    assert area(curves.fpr, curves.tpr) == pytest.approx(pixel_auroc(maps, masks), abs=1e-12)
    assert area(curves.fpr, curves.pro) == pytest.approx(aupro(maps, masks, fpr_limit=1.0), abs=1e-12)
    x, y = thin(curves.fpr, curves.tpr, resolution=0.05)
    assert x.size < curves.fpr.size and (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert area(x, y) == pytest.approx(area(curves.fpr, curves.tpr), abs=0.05)
    # eval's path: the curves of the ranking its metrics were read from, the pixels sorted once.
    metrics, ranked = _metrics_and_ranking(maps, masks, None, None, 0.3, "test")
    assert metrics == compute_metrics(maps, masks)
    reused = ranked_curves(ranked)
    for name in ("fpr", "tpr", "pro"):
        np.testing.assert_array_equal(getattr(reused, name), getattr(curves, name))


def test_overlay_marks_the_threshold_on_its_colour_bar_and_shows_the_decision():
    image = np.full((64, 64, 3), 128, np.uint8)
    values = np.zeros((64, 64))

    def bar_row(panel):  # the colour bar's middle row: the first row below the tiles that is the ramp's start
        pixels = np.asarray(panel)
        column = pixels[:, 4]
        row = next(r for r in range(20 + 256, pixels.shape[0]) if (column[r] < 10).all())
        return pixels[row + 4]

    plain = bar_row(overlay_panel(image, values, vmin=0.0, vmax=2.0))
    marked = bar_row(overlay_panel(image, values, vmin=0.0, vmax=2.0, threshold=1.0))
    changed = np.flatnonzero((plain != marked).any(axis=1))
    width = plain.shape[0]
    assert changed.size and abs(changed.mean() - width / 2) < 4, changed

    red = np.array([200, 30, 30])
    flagged = np.asarray(overlay_panel(image, values, vmin=0.0, vmax=2.0, is_anomalous=True))
    passed = np.asarray(overlay_panel(image, values, vmin=0.0, vmax=2.0, is_anomalous=False))
    assert (flagged[:18] == red).all(axis=-1).sum() > 50 and not (passed[:18] == red).all(axis=-1).any()


def test_read_losses_skips_a_torn_line_and_says_none_when_absent(tmp_path):
    log = tmp_path / LOG_NAME
    log.write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "loss": 0.25}\n{"step": 30, "lo')
    steps, losses = read_losses(log)
    assert steps.tolist() == [10, 20] and losses.tolist() == [0.5, 0.25]
    assert read_losses(tmp_path / "absent.jsonl") is None

