"""The ``pyramidflow`` command: synth, demo, train, eval, predict, plan, export, ablate.

Every failure a user can cause ends with one line on stderr that starts with
``error:`` and a non-zero exit status; Ctrl-C or SIGTERM during training writes a
checkpoint first (see :func:`pyramidflow.train.train`) and exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]

LAYOUTS = ("auto", "mvtec", "btad")
# Image side used by `demo` by default: small enough for 2 CPU cores in minutes.
DEMO_SIZE = 128
DEMO_STEPS = 200
DEMO_CHANNELS = 8  # the paper's 16 with k = 7 costs ~10x more per step on a CPU
DEMO_KERNEL_SIZE = 5


def _add_model_options(parser: argparse.ArgumentParser, ablation_switches: bool = True) -> None:
    group = parser.add_argument_group("model (defaults: the authors' settings for the category)")
    group.add_argument("--channels", type=int, help="feature channels C (16)")
    group.add_argument("--levels", type=int, dest="num_levels", help="pyramid levels L (4; 8 or 2 for some categories)")
    group.add_argument("--stacks", type=int, dest="num_stacks", help="coupling stacks (4)")
    group.add_argument("--kernel-size", type=int, help="kernel size of the coupling networks (7)")
    group.add_argument("--volume-norm", choices=("CVN", "SVN", "none") if ablation_switches else ("CVN", "SVN"),
                       help="volume normalisation (CVN; SVN for some categories; none: ablation, Gaussian NLL training)")
    group.add_argument("--mode", choices=("invertible", "checkpoint", "autograd"), help="backprop engine mode (invertible)")
    group.add_argument("--encoder", choices=("none", "resnet18"), help="frozen pretrained stem in place of the lift (none)")
    group.add_argument("--encoder-weights", metavar="imagenet|PATH",
                       help="weights of --encoder: 'imagenet' (download, needs the encoders extra) or a local state dict")
    if not ablation_switches:
        return
    ablation = parser.add_argument_group("ablations of the paper's Table 2 (defaults: the method)")
    ablation.add_argument("--template", choices=("mean", "zero"), help="latent template (mean)")
    ablation.add_argument("--difference", choices=("pyramid", "composed"),
                          help="subtract the template per level then compose (pyramid), or compose first (composed)")
    ablation.add_argument("--loss", choices=("fourier", "spatial"), help="pairwise loss (fourier)")


def _add_calibration_options(parser: argparse.ArgumentParser) -> None:
    from .pixel_threshold import DEFAULT_PIXEL_RULE, PIXEL_RULES

    group = parser.add_argument_group("decision thresholds (set on held-out good images, never on test data)")
    group.add_argument("--calibration-fraction", type=float, default=0.1, metavar="F",
                       help="share of train/good held out to set the thresholds (0.1, at least 4 images; 0: none)")
    group.add_argument("--image-fpr", type=float, default=0.01, help="target false-positive rate on good parts (0.01)")
    group.add_argument("--pixel-fpr", type=float, default=0.001, help="target false-positive rate on good pixels (0.001)")
    group.add_argument("--pixel-rule", choices=PIXEL_RULES, default=DEFAULT_PIXEL_RULE,
                       help="pixel threshold: 'synthetic' fits the mask to defects drawn into the held-out images, "
                            "never below the 'fpr' threshold; 'fpr' bounds false-positive pixels only (synthetic)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto picks CUDA when present")


def _add_smoothing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smooth", type=float, default=0.0, metavar="SIGMA", help="Gaussian smoothing of the maps, in pixels (0: off)")


def build_parser() -> argparse.ArgumentParser:
    from .engine.drift import DRIFT_POLICIES

    parser = argparse.ArgumentParser(
        prog="pyramidflow",
        description="PyramidFlow anomaly localisation: train on good images, get anomaly maps and scores.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write the synthetic data set (MVTec layout)")
    synth.add_argument("--out", required=True, type=Path, metavar="ROOT")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256)
    synth.add_argument("--num-train", type=int, default=32, help="good training images per category (32)")
    synth.add_argument("--num-test", type=int, default=4, help="test images per defect type, and good ones (4)")

    demo = commands.add_parser("demo", help="synthetic data, training, evaluation and overlays in one go")
    demo.add_argument("--out", required=True, type=Path, metavar="DIR")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps per category ({DEMO_STEPS})")
    demo.add_argument("--size", type=int, default=DEMO_SIZE, help=f"image side ({DEMO_SIZE})")
    demo.add_argument("--seed", type=int, default=0)
    _add_device(demo)

    train = commands.add_parser("train", help="train on the good images of one category")
    train.add_argument("--data", required=True, type=Path, metavar="ROOT")
    train.add_argument("--category", required=True)
    train.add_argument("--out", required=True, type=Path, metavar="DIR")
    train.add_argument("--layout", choices=LAYOUTS, default="auto", help="data set layout (auto: detect)")
    train.add_argument("--size", type=int, default=256, help="image side (256)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int)
    budget.add_argument("--epochs", type=int, help="passes over the training images (15 if no budget is given)")
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS")
    train.add_argument("--resume", action="store_true", help="continue DIR/checkpoint.pt")
    train.add_argument("--no-augment", action="store_true",
                       help="no flips/rotations of texture images (on by default for textures, as the authors)")
    train.add_argument("--drift", choices=DRIFT_POLICIES, default="recompute",
                       help="what backward does when reconstruction drifts (recompute: rebuild exactly)")
    _add_calibration_options(train)
    train.add_argument("--no-plan", action="store_true", help="on CUDA, skip the check that the predicted peak memory fits the GPU")
    _add_device(train)
    _add_model_options(train)

    plan = commands.add_parser("plan", help="predicted peak training memory per mode, and what fits on a GPU",
                               description="Predicted peak memory of one training step per mode, and what fits on a GPU. "
                               "--encoder resnet18 needs no --encoder-weights here: memory does not depend on the "
                               "weights' values, so plan never reads them (any given are ignored).")  # fmt: skip
    plan.add_argument("--size", type=int, required=True, help="image side")
    plan.add_argument("--batch-size", type=int, default=2)
    plan.add_argument("--category", default="", help="take the authors' settings for this category (default: the defaults)")
    plan.add_argument("--gpu-memory", default=None, metavar="BYTES", help="the GPU's memory, e.g. 12GiB: print the largest batch and side that fit")
    plan.add_argument("--json", action="store_true", help="print JSON (predicted_peak_bytes, max_batch_size, max_size)")
    _add_model_options(plan)

    ablate = commands.add_parser("ablate", help="train and evaluate the paper's ablations (Table 2) on one category")
    ablate.add_argument("--data", required=True, type=Path, metavar="ROOT")
    ablate.add_argument("--category", required=True)
    ablate.add_argument("--out", required=True, type=Path, metavar="DIR", help="DIR/ablation.json, DIR/ablation.md, DIR/<variant>/")
    ablate.add_argument("--layout", choices=LAYOUTS, default="auto", help="data set layout (auto: detect)")
    ablate.add_argument("--size", type=int, default=256, help="image side (256)")
    ablate_budget = ablate.add_mutually_exclusive_group()
    ablate_budget.add_argument("--steps", type=int, help="training steps per variant")
    ablate_budget.add_argument("--epochs", type=int, help="passes over the training images per variant (15 if no budget is given)")
    ablate.add_argument("--variants", nargs="+", metavar="NAME",
                        help="baseline no_volume_norm zero_template composed_difference spatial_loss (default: all)")
    ablate.add_argument("--batch-size", type=int, default=2)
    ablate.add_argument("--seed", type=int, default=0)
    ablate.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS")
    ablate.add_argument("--no-augment", action="store_true", help="no flips/rotations of texture images")
    _add_device(ablate)
    _add_model_options(ablate, ablation_switches=False)

    evaluate = commands.add_parser("eval", help="metrics and overlays of a checkpoint on a labelled test set")
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    evaluate.add_argument("--data", required=True, type=Path, metavar="ROOT")
    evaluate.add_argument("--category", required=True)
    evaluate.add_argument("--out", required=True, type=Path, metavar="DIR")
    evaluate.add_argument("--layout", choices=LAYOUTS, default="auto")
    _add_device(evaluate)
    _add_smoothing(evaluate)

    predict = commands.add_parser("predict", help="anomaly maps and scores of any images")
    predict.add_argument("--checkpoint", required=True, type=Path)
    predict.add_argument("--out", required=True, type=Path, metavar="DIR")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--image-threshold", type=float, help="override the calibrated image threshold")
    predict.add_argument("--pixel-threshold", type=float, help="override the calibrated pixel threshold")
    predict.add_argument("--tile", action="store_true",
                         help="images larger than the trained size: overlapping tiles at native resolution")
    _add_device(predict)
    _add_smoothing(predict)

    export = commands.add_parser("export", help="the inference graph of a checkpoint as ONNX or TorchScript")
    export.add_argument("--checkpoint", required=True, type=Path)
    export.add_argument("--out", required=True, type=Path, metavar="FILE", help="e.g. model.onnx or model.pt")
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="onnx (default) or torchscript")
    export.add_argument("--batch-size", type=_export_batch_size, default=1, metavar="N|dynamic",
                        help="batch size of the graph, or 'dynamic' for any (default 1)")
    return parser


def _export_batch_size(text: str):
    """``--batch-size`` of export: a positive int, or ``dynamic`` (None)."""
    if text.strip().lower() == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {text!r}")
    return value


# -- data ------------------------------------------------------------------------------


def _layout(root: Path, category: str, layout: str) -> str:
    if layout != "auto":
        return layout
    if (root / category / "train" / "ok").is_dir():
        return "btad"
    return "mvtec"


def _dataset(root: Path, category: str, split: str, size, layout: str):
    from .data import BTADDataset, MVTecDataset

    cls = BTADDataset if _layout(root, category, layout) == "btad" else MVTecDataset
    return cls(root, category, split=split, size=size)


def _model_config(args: argparse.Namespace):
    from .model import PyramidFlowConfig

    overrides = {
        name: getattr(args, name)
        for name in ("channels", "num_levels", "num_stacks", "kernel_size", "volume_norm", "mode", "encoder",
                     "encoder_weights", "template", "difference", "loss")
        if getattr(args, name, None) is not None
    }
    if overrides.get("volume_norm") == "none":
        overrides["volume_norm"] = None
    return PyramidFlowConfig.for_category(args.category, **overrides)


def _check_size(size: int, config) -> None:
    multiple, stride = config.size_multiple, config.input_stride
    if size < multiple or size % multiple:
        nearest = config.nearest_valid_size(size)
        factor = f"2^(levels-1) = {multiple}" if stride == 1 else f"{stride}·2^(levels-1) = {multiple} (--encoder {config.encoder})"
        raise ValueError(f"--size {size} is not divisible by {factor} (levels={config.num_levels}); use --size {nearest}.")


# -- commands ----------------------------------------------------------------------------


def _cmd_synth(args: argparse.Namespace) -> None:
    from .data import synthetic

    root = synthetic.generate(args.out, seed=args.seed, size=args.size, num_train=args.num_train, num_test=args.num_test)
    print(f"synthetic data set written to {root} (categories: {', '.join(synthetic.CATEGORIES)})")


def _train(args: argparse.Namespace, model_config, steps: Optional[int], epochs: Optional[int]) -> Path:
    from .train import TrainConfig, train

    _check_size(args.size, model_config)
    dataset = _dataset(args.data, args.category, "train", args.size, getattr(args, "layout", "auto"))
    train_config = TrainConfig(
        steps=steps,
        epochs=epochs,
        batch_size=getattr(args, "batch_size", 2),
        seed=args.seed,
        checkpoint_every=getattr(args, "checkpoint_every", 500),
        device=args.device,
        augment=False if getattr(args, "no_augment", False) else bool(getattr(dataset, "augment", False)),
        drift=getattr(args, "drift", "recompute"),
        calibration_fraction=getattr(args, "calibration_fraction", 0.1),
        image_fpr=getattr(args, "image_fpr", 0.01),
        pixel_fpr=getattr(args, "pixel_fpr", 0.001),
        pixel_rule=getattr(args, "pixel_rule", TrainConfig.pixel_rule),
    )
    if not getattr(args, "no_plan", True):
        _preflight(args, model_config, train_config)
    result = train(model_config, train_config, dataset, args.out, resume=getattr(args, "resume", False))
    return result.checkpoint_path


def _preflight(args: argparse.Namespace, model_config, train_config) -> None:
    """On CUDA: stop before the first step if the predicted peak memory does not fit the GPU."""
    import torch

    from .plan import preflight
    from .train import resolve_device

    device = resolve_device(train_config.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        preflight(model_config, args.size, train_config.batch_size, total)


def _cmd_plan(args: argparse.Namespace) -> None:
    from .plan import MODES, WEIGHTS_NOT_READ, format_plan, parse_bytes, plan

    if args.encoder not in (None, "none") and args.encoder_weights is None:
        args.encoder_weights = WEIGHTS_NOT_READ  # plan never reads them: NOTE [planning without encoder weights]
    config = _model_config(args)
    memory = parse_bytes(args.gpu_memory) if args.gpu_memory is not None else None
    modes = (args.mode,) if args.mode else MODES
    result = plan(config, args.size, args.batch_size, modes=modes, gpu_memory=memory)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))


def _cmd_train(args: argparse.Namespace) -> None:
    steps, epochs = args.steps, args.epochs
    if steps is None and epochs is None:
        epochs = 15  # the reference run's budget
    path = _train(args, _model_config(args), steps, epochs)
    print(f"checkpoint written to {path}")


def _cmd_ablate(args: argparse.Namespace) -> None:
    from .ablation import resolve_variants, run_ablation
    from .train import TrainConfig

    variants = [v.name for v in resolve_variants(args.variants)]  # unknown names fail before any data is read
    steps, epochs = args.steps, args.epochs
    if steps is None and epochs is None:
        epochs = 15
    base = _model_config(args)
    _check_size(args.size, base)
    train_set = _dataset(args.data, args.category, "train", args.size, args.layout)
    test_set = _dataset(args.data, args.category, "test", args.size, args.layout)
    train_config = TrainConfig(
        steps=steps, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
        checkpoint_every=args.checkpoint_every, device=args.device,
        augment=False if args.no_augment else bool(getattr(train_set, "augment", False)),
    )
    results = run_ablation(base, train_config, train_set, test_set, args.out, category=args.category, variants=variants)
    print(f"{'variant':<20} {'pixel AUROC':>11} {'AUPRO@0.3':>10} {'image AUROC':>11}")
    for row in results:
        print(f"{row['variant']:<20} {row['pixel_auroc']:>11.4f} {row['aupro']:>10.4f} {row['image_auroc']:>11.4f}")
    print(f"table written to {args.out / 'ablation.md'} and {args.out / 'ablation.json'}")


def _print_table(rows: Sequence[dict]) -> None:
    print(f"{'category':<12} {'pixel AUROC':>11} {'AUPRO@0.3':>10} {'image AUROC':>11}")
    for row in rows:
        print(f"{row['category']:<12} {row['pixel_auroc']:>11.4f} {row['aupro']:>10.4f} {row['image_auroc']:>11.4f}")
    print(f"\nat the calibrated thresholds:\n{'category':<12} {'image FPR':>9} {'recall':>7} {'precision':>9} "
          f"{'pixel F1':>8} {'pixel IoU':>9}   {'best pixel F1 (uses test labels)':>32}")
    for row in rows:
        best = row.get("best_pixel_f1_using_test_labels")
        best = "n/a" if best is None else f"{best:.3f} at {row['best_pixel_threshold_using_test_labels']:.4g}"
        print(f"{row['category']:<12} {row['image_fpr']:>9.3f} {row['image_recall']:>7.3f} {row['image_precision']:>9.3f} "
              f"{row['pixel_f1']:>8.3f} {row['pixel_iou']:>9.3f}   {best:>32}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, load_for_inference
    from .train import resolve_device

    inference = load_for_inference(args.checkpoint, resolve_device(args.device))
    dataset = _dataset(args.data, args.category, "test", inference.image_size, args.layout)
    report = evaluate(inference, dataset, args.out, smoothing_sigma=args.smooth, category=args.category)
    _print_table([report])
    print(f"metrics and overlays written to {args.out}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from .evaluate import load_for_inference, predict
    from .train import resolve_device

    inference = load_for_inference(args.checkpoint, resolve_device(args.device))
    rows = predict(inference, args.inputs, args.out, smoothing_sigma=args.smooth, image_threshold=args.image_threshold,
                   pixel_threshold=args.pixel_threshold, tile=args.tile)
    for row in rows:
        verdict = f"ANOMALOUS, {len(row['regions'])} region(s)" if row["is_anomalous"] else "good"
        print(f"{row['score']:10.4f}  {verdict:<26} {row['path']}")
    print(f"masks, maps, overlays, predictions.json and predictions.csv written to {args.out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import ONNX_OPSET, export_checkpoint

    try:
        path = export_checkpoint(args.checkpoint, args.out, format=args.format, batch_size=args.batch_size)
    except ModuleNotFoundError as error:  # the optional `export` extra is missing
        raise RuntimeError(str(error)) from None
    batch = "any" if args.batch_size is None or args.format == "torchscript" else args.batch_size
    opset = f"opset {ONNX_OPSET}, " if args.format == "onnx" else ""
    print(f"{args.format} graph written to {path} ({opset}batch {batch}): ImageNet-normalised images -> anomaly_map, "
          "score (shapes and normalisation in the file's metadata)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .data import synthetic
    from .evaluate import evaluate, load_for_inference
    from .model import PyramidFlowConfig
    from .train import resolve_device

    start = time.perf_counter()
    out = Path(args.out)
    data_root = synthetic.generate(out / "data", seed=args.seed, size=args.size)
    print(f"synthetic data set written to {data_root}")
    rows = []
    for category in synthetic.CATEGORIES:
        print(f"\n== {category} ({'texture' if synthetic.is_texture(category) else 'object'}) ==")
        run = argparse.Namespace(
            data=data_root, category=category, out=out / category, size=args.size, seed=args.seed,
            device=args.device, layout="mvtec", batch_size=2, checkpoint_every=max(args.steps, 1),
        )
        config = PyramidFlowConfig.for_category(category, **demo_overrides(category))
        checkpoint = _train(run, config, args.steps, None)
        dataset = _dataset(data_root, category, "test", args.size, "mvtec")
        inference = load_for_inference(checkpoint, resolve_device(args.device))
        report = evaluate(inference, dataset, out / category, category=category)
        rows.append(report)
    summary = {
        key: sum(r[key] for r in rows) / len(rows) for key in ("pixel_auroc", "image_auroc", "aupro")
    }
    decided = ("image_fpr", "image_recall", "image_precision", "pixel_f1", "pixel_iou", "image_threshold", "pixel_threshold")
    summary.update(demo_decisions(rows))
    summary.update(
        categories={r["category"]: {k: r[k] for k in ("pixel_auroc", "image_auroc", "aupro") + decided} for r in rows},
        steps=args.steps, size=args.size, seed=args.seed, seconds=round(time.perf_counter() - start, 1),
    )
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    _print_table(rows + [dict(summary, category="all")])
    print(f"\nmetrics: {out / 'metrics.json'}; overlays: {out}/<category>/overlays/ ({summary['seconds']} s)")


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


def demo_overrides(category: str) -> dict:
    """Model settings of the demo: the method's architecture, narrower, so 2 CPU cores train it in minutes."""
    from .data import synthetic

    return dict(channels=DEMO_CHANNELS, kernel_size=DEMO_KERNEL_SIZE, volume_norm="SVN" if synthetic.is_texture(category) else "CVN")


_COMMANDS = {
    "synth": _cmd_synth, "demo": _cmd_demo, "train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict,
    "plan": _cmd_plan, "export": _cmd_export, "ablate": _cmd_ablate,
}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pyramidflow`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except KeyboardInterrupt as interrupt:
        from .interrupts import TrainingTerminated, exit_status

        what = f"terminated ({interrupt})" if isinstance(interrupt, TrainingTerminated) else "interrupted"
        print(f"error: {what} (a training run has written its checkpoint; continue it with --resume)", file=sys.stderr)
        return exit_status(interrupt)
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
