"""The synthetic demo as a workflow: write the data set, train and evaluate a small model per category.

It calls :func:`pyramidflow.train.train` and :func:`pyramidflow.inference.evaluate.evaluate` as any
user script would; ``pyramidflow demo`` only prints what :func:`run_demo` returns.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from .._utils import resolve_device, write_text_atomic

__all__ = ["DEMO_SIZE", "DEMO_STEPS", "run_demo", "demo_overrides", "demo_decisions"]

# Image side used by `demo` by default: small enough for 2 CPU cores in minutes.
DEMO_SIZE = 128
DEMO_STEPS = 200
DEMO_CHANNELS = 8  # the paper's 16 with k = 7 costs ~10x more per step on a CPU
DEMO_KERNEL_SIZE = 5
_AUROCS = ("pixel_auroc", "image_auroc", "aupro")
_DECIDED = ("image_fpr", "image_recall", "image_precision", "pixel_f1", "pixel_iou", "image_threshold", "pixel_threshold")


def demo_overrides(category: str) -> dict:
    """Model settings of the demo: the method's architecture, narrower, so 2 CPU cores train it in minutes."""
    from ..data import synthetic

    return dict(channels=DEMO_CHANNELS, kernel_size=DEMO_KERNEL_SIZE, volume_norm="SVN" if synthetic.is_texture(category) else "CVN")


def demo_decisions(reports: Sequence[dict]) -> dict:
    """Decision metrics over all categories: image counts pooled (each category has its own thresholds)."""
    good = sum(r["num_images"] - r["num_anomalous"] for r in reports)
    bad = sum(r["num_anomalous"] for r in reports)
    false_alarms = sum(round(r["image_fpr"] * (r["num_images"] - r["num_anomalous"])) for r in reports)
    found = sum(round(r["image_recall"] * r["num_anomalous"]) for r in reports)
    return {
        "image_fpr": false_alarms / max(good, 1),
        "image_recall": found / max(bad, 1),
        "image_precision": found / max(found + false_alarms, 1),
        "pixel_f1": sum(r["pixel_f1"] for r in reports) / len(reports),
        "pixel_iou": sum(r["pixel_iou"] for r in reports) / len(reports),
        "false_alarms": f"{false_alarms}/{good}",
        "defects_found": f"{found}/{bad}",
    }


# NOTE [a resumable demo]
# The demo writes its settings to DIR/demo.json before anything else. A stopped demo (Ctrl-C, SIGTERM)
# keeps what is done: the data set, every evaluated category (DIR/<category>/metrics.json), and the
# checkpoint of the category in training; `--resume` (resume=True) with the same settings regenerates
# nothing it can reuse (the data set is drawn again from the seed, byte for byte the same), reads the
# finished categories' reports, continues the checkpoint of the stopped one bit for bit, and trains the
# rest. A fresh demo into a folder that holds one is refused with that way out.
SETTINGS_NAME = "demo.json"
# A run predicted to take longer than this gets a hint at the start: the default demo on 2 idle CPU cores
# stays below it, a CPU shared with other jobs does not.
_SLOW_MINUTES = 15
# The settings the hint suggests for a quick look on such a machine.
_QUICK_SIZE, _QUICK_STEPS = 64, 40


def run_demo(out: str | Path, *, steps: int = DEMO_STEPS, size: int = DEMO_SIZE, seed: int = 0, device: str = "auto",
             log: Callable[[str], None] = print, resume: bool = False) -> tuple[list[dict], dict]:
    """Synthetic data under ``out/data``, then per category a run in ``out/<category>`` and its evaluation.

    Each category's evaluation writes its page, ``out/<category>/report.html``; ``out/report.html``
    links the three with their headline figures (:mod:`pyramidflow.inference.report_index`).

    Args:
        resume: continue a stopped demo in ``out`` with the same ``steps``, ``size`` and ``seed``
            (NOTE [a resumable demo]).

    Returns:
        The evaluation report of every category, and the summary written to ``out/metrics.json``
        (mean AUROCs and AUPRO, pooled decisions, per-category figures, settings, seconds).

    Raises:
        ValueError: ``out`` holds a demo and ``resume`` is false, or ``resume`` is true and ``out`` holds
            no demo or one with other settings.
        KeyboardInterrupt: Ctrl-C or SIGTERM; its note says what is kept and how to continue.
    """
    # Imported here: `pyramidflow --help` reads this module's defaults without loading training or inference.
    from ..checkpoint import CHECKPOINT_NAME
    from ..data import MVTecDataset, synthetic
    from ..inference.evaluate import evaluate
    from ..inference.maps import load_for_inference
    from ..inference.report_index import write_index_report
    from ..model import PyramidFlowConfig
    from ..train import TrainConfig, train
    from ..train.interrupts import add_note, describe

    start = time.perf_counter()
    out = Path(out)
    settings_of_run = {"steps": steps, "size": size, "seed": seed}
    _start_or_resume(out, settings_of_run, resume)
    reports: list[dict] = []
    where = "the data set"
    try:
        data_root = synthetic.generate(out / "data", seed=seed, size=size)
        log(f"synthetic data set written to {data_root}")
        for category in synthetic.CATEGORIES:
            where = category
            log(f"\n== {category} ({'texture' if synthetic.is_texture(category) else 'object'}) ==")
            config = PyramidFlowConfig.for_category(category, **demo_overrides(category))
            config.check_image_size(size, size, where="run_demo: size")
            if category == synthetic.CATEGORIES[0]:
                _hint_if_slow(config, TrainConfig(steps=steps, seed=seed, device=device), size,
                              len(synthetic.CATEGORIES), out, log)
            finished = _finished_report(out / category)
            if finished is not None:
                log(f"evaluated before: {out / category / 'metrics.json'}")
                reports.append(finished)
                continue
            train_set = MVTecDataset(data_root, category, split="train", size=size)
            settings = TrainConfig(steps=steps, seed=seed, checkpoint_every=max(steps, 1), device=device,
                                   augment=bool(train_set.augment))
            checkpoint = out / category / CHECKPOINT_NAME
            result = train(config, settings, train_set, out / category, resume=resume and checkpoint.is_file())
            inference = load_for_inference(result.checkpoint_path, resolve_device(device))
            test_set = MVTecDataset(data_root, category, split="test", size=size)
            reports.append(evaluate(inference, test_set, out / category, category=category))
    except KeyboardInterrupt as interrupt:
        again = _command(out, settings_of_run)
        add_note(interrupt, f"demo: {describe(interrupt)} in {where}, {len(reports)} of {len(synthetic.CATEGORIES)} "
                            f"categories finished; "
                            f"continue with `{again} --resume` (resume=True), which keeps what is done.")
        raise
    summary = {key: sum(r[key] for r in reports) / len(reports) for key in _AUROCS}
    summary.update(demo_decisions(reports))
    summary.update(
        categories={r["category"]: {k: r[k] for k in _AUROCS + _DECIDED} for r in reports},
        steps=steps, size=size, seed=seed, seconds=round(time.perf_counter() - start, 1),
    )
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    write_index_report(out, [out / category for category in synthetic.CATEGORIES], title="pyramidflow demo")
    return reports, summary


def _command(out: Path, settings: dict) -> str:
    """The ``pyramidflow demo`` command line of these settings (defaults left out)."""
    flags = [f"--{name} {value}" for name, value in settings.items() if value != _DEFAULTS[name]]
    return " ".join(["pyramidflow demo --out", str(out), *flags])


_DEFAULTS = {"steps": DEMO_STEPS, "size": DEMO_SIZE, "seed": 0}


def _start_or_resume(out: Path, settings: dict, resume: bool) -> None:
    """Record the settings of a fresh demo, or check a resumed one's (NOTE [a resumable demo])."""
    path = out / SETTINGS_NAME
    if not resume:
        if path.is_file():
            raise ValueError(f"run_demo: {out} holds a demo already ({path}); continue it with --resume "
                             f"(resume=True), or choose another --out.")
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
        return
    if not path.is_file():
        raise ValueError(f"run_demo: --resume, but {out} holds no demo ({path} is missing); run without --resume.")
    started = json.loads(path.read_text())
    differ = [f"--{name} {started.get(name)} (given {value})" for name, value in settings.items()
              if started.get(name) != value]
    if differ:
        raise ValueError(f"run_demo: {out} was started with {', '.join(differ)}; resume with "
                         f"`{_command(out, started)} --resume`, or choose another --out for new settings.")


def _finished_report(folder: Path) -> dict | None:
    """The evaluation report of a category a previous run finished, or ``None``."""
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _hint_if_slow(config, settings, size: int, categories: int, out: Path, log: Callable[[str], None]) -> None:
    """Time one training step of the demo's model; when the run would be long, say what to do about it."""
    import torch

    from ..train.step import step_on_random_images

    with torch.random.fork_rng(devices=[]):  # the probe's seeding must not change the run's draws
        take_step = step_on_random_images(config, size, settings.batch_size, resolve_device(settings.device), settings)
        take_step()  # the first step also allocates
        begin = time.perf_counter()
        take_step()
        seconds = time.perf_counter() - begin
    minutes = seconds * settings.steps * categories / 60
    if minutes <= _SLOW_MINUTES:
        return
    quick = dict(size=min(size, _QUICK_SIZE), steps=min(settings.steps, _QUICK_STEPS))
    smaller = quick != dict(size=size, steps=settings.steps)
    look = (f" For a quick look: Ctrl-C, then `{_command(out.parent / (out.name + '-small'), {**_DEFAULTS, **quick})}`;"
            f" or let it run" if smaller else " Let it run")
    log(f"demo: a training step takes {seconds:.1f} s here, so training the {categories} categories takes about "
        f"{minutes:.0f} min (a slow CPU, or one shared with other jobs).{look} (Ctrl-C keeps what is done, "
        f"--resume continues).")
