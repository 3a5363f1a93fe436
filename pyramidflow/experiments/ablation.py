"""The paper's ablation (its Table 2) on your own data: train and evaluate each variant, one table.

:func:`run_ablation` trains the baseline and each ablation with the same seed, data and budget,
evaluates each on the same test set, and writes ``ablation.json`` and ``ablation.md`` with the
paper's Table 2 means beside ours (labelled as the paper's: they are MVTec AD means, not ours). Each
variant lives in its own folder ``<out>/<variant>/`` with its checkpoint and a ``result.json``
written when it is finished, so an interrupted ablation resumes: finished variants are skipped and
an interrupted one continues from its checkpoint (bit for bit, see ``NOTE [resume bit for bit]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .._utils import write_text_atomic
from ..checkpoint import CHECKPOINT_NAME
from ..train.config import TrainConfig

__all__ = ["VARIANTS", "PAPER_TABLE_2", "Variant", "run_ablation", "variant_config", "step_peak_memory", "ablation_markdown"]


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: a name, what it changes, and the config fields it sets."""

    name: str
    description: str
    overrides: tuple  # (field, value) pairs applied to the baseline's PyramidFlowConfig


VARIANTS = (
    Variant("baseline", "the method (volume normalisation, mean template, pyramid difference, Fourier loss)", ()),
    Variant("no_volume_norm", "no volume normalisation, Gaussian NLL with log-det", (("volume_norm", None),)),
    Variant("zero_template", "zero template: the map is |z|", (("template", "zero"),)),
    Variant("composed_difference", "compose the latents first, then subtract", (("difference", "composed"),)),
    Variant("spatial_loss", "spatial instead of Fourier loss", (("loss", "spatial"),)),
)
_BY_NAME = {v.name: v for v in VARIANTS}

# Lei et al., CVPR 2023, Table 2: mean over the 15 MVTec AD classes, from scratch, pixel AUROC / AUPRO in %.
# The paper's figures, not ours: quoted beside our measurements, never computed here.
PAPER_TABLE_2 = {
    "baseline": (95.5, 94.0),
    "no_volume_norm": (86.6, 84.9),
    "zero_template": (91.5, 87.1),
    "composed_difference": (91.3, 88.9),
    "spatial_loss": (92.9, 92.2),
}
RESULT_NAME = "result.json"
SETTINGS_NAME = "ablation_settings.json"


def resolve_variants(names: Optional[Sequence[str]]) -> list[Variant]:
    """The variants named (all, baseline first, for ``None``); unknown names raise with the known ones."""
    if not names:
        return list(VARIANTS)
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(_BY_NAME)}.")
    return [_BY_NAME[n] for n in dict.fromkeys(names)]


def variant_config(base: Any, variant: Variant) -> Any:
    """The baseline's config with the variant's one change. ``no_volume_norm`` also resets ``loss`` to
    the default: without volume normalisation the objective is the Gaussian NLL, whatever ``loss`` says."""
    changes = dict(variant.overrides)
    if changes.get("volume_norm", "unset") is None:
        changes["loss"] = "fourier"
    return dataclasses.replace(base, **changes)


def step_peak_memory(model_config: Any, images: torch.Tensor, device: torch.device, train_config: TrainConfig,
                     seed: int = 0) -> int:
    """Peak bytes of one training step (:func:`pyramidflow.train.step.training_step`: forward, the
    variant's loss, backward, clipping, Adam) of a fresh model.

    Measured as the benchmarks measure: above what was live before the step, from the CUDA
    allocator's statistics, or on CPU from the profiler's allocation events (deterministic).
    """
    from ..memory import peak_memory
    from ..model import PyramidFlow
    from ..train.step import make_optimizer, training_step

    torch.manual_seed(seed)
    model = PyramidFlow(model_config).to(device=device, dtype=images.dtype).train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], train_config)
    images = images.to(device)

    def step() -> None:
        training_step(model, optimizer, images, model_config=model_config, config=train_config)

    peak, _ = peak_memory(step, device)
    return int(peak)


def _settings(base: Any, train_config: Any, category: str) -> dict:
    return {
        "category": category,
        "base_model_config": dataclasses.asdict(base),
        "train_config": dataclasses.asdict(train_config),
    }


def _check_settings(path: Path, settings: dict) -> None:
    """An ablation folder serves one set of settings: a resumed run must use the same ones (checked before any work)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != settings:
            differing = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise ValueError(
                f"ablate: {path.parent} holds an ablation run with other settings ({', '.join(differing)} differ); "
                "use the same options to resume it, or another --out folder."
            )
    else:
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def _evaluate(checkpoint: Path, test_set: Dataset, device: torch.device) -> dict:
    from ..inference.maps import load_for_inference, predict_dataset
    from ..metrics import compute_metrics

    inference = load_for_inference(checkpoint, device)
    predictions = predict_dataset(inference.model, inference.template, test_set, device=device, progress=False)
    metrics = compute_metrics(predictions.maps, predictions.masks, predictions.scores, predictions.labels)
    return {k: float(v) for k, v in metrics.items()}


def _first_batch(dataset: Dataset, batch_size: int) -> torch.Tensor:
    """The data set's first ``batch_size`` images, unaugmented: the same input for every variant's memory step."""
    augment = getattr(dataset, "augment", None)
    if isinstance(augment, bool):
        dataset.augment = False
    try:
        return torch.stack([dataset[i]["image"] for i in range(min(batch_size, len(dataset)))])
    finally:
        if isinstance(augment, bool):
            dataset.augment = augment


def _run_variant(variant: Variant, base: Any, train_config: Any, train_set: Dataset, test_set: Dataset,
                 folder: Path, settings: dict, progress: bool) -> dict:
    from .._utils import resolve_device
    from ..train import train

    config = variant_config(base, variant)
    device = resolve_device(train_config.device)
    resumed = (folder / CHECKPOINT_NAME).is_file()
    start = time.perf_counter()
    result = train(config, train_config, train_set, folder, resume=resumed, progress=progress)
    seconds = time.perf_counter() - start
    metrics = _evaluate(result.checkpoint_path, test_set, device)
    peak = step_peak_memory(config, _first_batch(train_set, train_config.batch_size), device, train_config,
                            seed=train_config.seed)
    paper = PAPER_TABLE_2[variant.name]
    return {
        "variant": variant.name,
        "description": variant.description,
        "settings": settings,
        "model_config": dataclasses.asdict(config),
        "objective": config.objective,
        **metrics,
        "train_seconds": round(seconds, 1),
        "train_resumed": resumed,
        "steps": result.step,
        "peak_memory_bytes": peak,
        "device": str(device),
        "paper_pixel_auroc": paper[0],
        "paper_aupro": paper[1],
    }


def run_ablation(
    base: Any,
    train_config: Any,
    train_set: Dataset,
    test_set: Dataset,
    out_dir: str | os.PathLike,
    *,
    category: str = "",
    variants: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> list[dict]:
    """Train and evaluate the baseline and each ablation; write ``ablation.json`` and ``ablation.md``.

    Every variant trains from the same seed on the same images (and augmentation draws) for the same
    budget, then is evaluated on ``test_set``. A variant whose ``result.json`` exists is not trained
    again; one with only a checkpoint resumes from it.

    Args:
        base: the baseline ``PyramidFlowConfig`` (its ablation switches must be the defaults).
        train_config: the ``TrainConfig`` shared by every variant.
        train_set: normal training images; ``test_set``: the labelled test set at the same size.
        out_dir: folder of the ablation; ``<out_dir>/<variant>/`` holds each variant's run.
        category: recorded in the results.
        variants: names from :data:`VARIANTS` (default: all).
        progress: tqdm bars (one across variants, one per training run).

    Returns:
        One result dict per variant, in order.

    Raises:
        ValueError: unknown variants, a baseline with a switch already flipped, or a folder holding an
            ablation with other settings.
    """
    from tqdm.auto import tqdm

    chosen = resolve_variants(variants)
    flipped = [f"{name}={getattr(base, name)!r}" for name, default in
               (("volume_norm", "set"), ("template", "mean"), ("difference", "pyramid"), ("loss", "fourier"),
                ("loss_p", 2))
               if (getattr(base, name) is None if default == "set" else getattr(base, name) != default)]
    if flipped:
        raise ValueError(f"ablate: the baseline must be the method, but it sets {', '.join(flipped)}; drop those options.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(_settings(base, train_config, category)))  # as it reads back from JSON
    _check_settings(out_dir / SETTINGS_NAME, settings)
    results = []
    bar = tqdm(chosen, desc="ablation", unit="variant", disable=not progress, dynamic_ncols=True)
    for variant in bar:
        bar.set_postfix(variant=variant.name)
        folder = out_dir / variant.name
        done = folder / RESULT_NAME
        if done.is_file():
            result = json.loads(done.read_text())
        else:
            folder.mkdir(parents=True, exist_ok=True)
            result = _run_variant(variant, base, train_config, train_set, test_set, folder, settings, progress)
            write_text_atomic(done, json.dumps(result, indent=2) + "\n")
        results.append(result)
    bar.close()
    write_text_atomic(out_dir / "ablation.json", json.dumps({"settings": settings, "variants": results}, indent=2) + "\n")
    write_text_atomic(out_dir / "ablation.md", ablation_markdown(results))
    return results


def ablation_markdown(results: Sequence[dict]) -> str:
    """The ablation table in Markdown: ours (in %), train time, peak memory, and the paper's Table 2 means."""
    lines = [
        "| variant | pixel AUROC | AUPRO@0.3 | image AUROC | train time | peak memory (1 step) "
        "| paper: pixel AUROC | paper: AUPRO |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        resumed = " (resumed)" if r.get("train_resumed") else ""
        lines.append(
            f"| {r['variant']} | {100 * r['pixel_auroc']:.1f} | {100 * r['aupro']:.1f} | {100 * r['image_auroc']:.1f} "
            f"| {r['train_seconds']:.0f} s{resumed} | {r['peak_memory_bytes'] / 2**20:.1f} MiB "
            f"| {r['paper_pixel_auroc']:.1f} | {r['paper_aupro']:.1f} |"
        )
    lines += [
        "",
        "Ours: this data set, one seed. Paper: Lei et al., CVPR 2023, Table 2, mean over the 15 MVTec AD classes "
        "(from scratch, AUPRO as the authors integrate it); quoted, not measured here. Train time: wall clock of "
        "the training run in this process (only the part after a resume). Peak memory: one training step of a "
        "fresh model, above what was live before it (CPU: profiler allocation events; CUDA: allocator peak).",
        "",
    ]
    return "\n".join(lines)
