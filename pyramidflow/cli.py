"""The ``pyramidflow`` command: synth, demo, train, eval, predict, plan, export, ablate.

Every failure a user can cause ends with one line on stderr that starts with
``error:`` and a non-zero exit status. Ctrl-C or SIGTERM, from the first moment of any
command, ends it with one such line and exits with 130 or 143; training writes a checkpoint
first (see :func:`pyramidflow.train.train`), ``predict`` the rows of the images it finished.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence

# Standard library only: imported before torch (NOTE [light package import] in pyramidflow/__init__.py).
from .cpu_threads import apply_cpu_defaults
from .train.interrupts import InterruptGuard, describe, exit_status

if TYPE_CHECKING:
    from .inference.plot_worker import PlotWorker

__all__ = ["main", "build_parser"]

LAYOUTS = ("auto", "mvtec", "btad")
_DATA_HELP = "root of the data set: ROOT/<category>/train/good/... (MVTec AD or BTAD layout)"
_CATEGORY_HELP = "the category folder under ROOT, e.g. nut"
_CHECKPOINT_HELP = "the checkpoint.pt written by `pyramidflow train`"


def _add_model_options(parser: argparse.ArgumentParser, ablation_switches: bool = True) -> None:
    from .engine import MODES
    from .model import PyramidFlowConfig
    from .model.anomaly_map import DIFFERENCES, TEMPLATES
    from .model.encoder import ENCODERS
    from .model.loss import LOSSES
    from .model.volume_norm import VOLUME_NORM_MODES

    method = PyramidFlowConfig()
    group = parser.add_argument_group("model (defaults: the authors' settings for the category)")
    group.add_argument("--channels", type=int, help=f"feature channels C ({method.channels})")
    group.add_argument("--levels", type=int, dest="num_levels",
                       help=f"pyramid levels L ({method.num_levels}; 8 or 2 for some categories)")
    group.add_argument("--stacks", type=int, dest="num_stacks", help=f"coupling stacks ({method.num_stacks})")
    group.add_argument("--kernel-size", type=int, help=f"kernel size of the coupling networks ({method.kernel_size})")
    group.add_argument("--volume-norm", choices=VOLUME_NORM_MODES + ("none",) if ablation_switches else VOLUME_NORM_MODES,
                       help=f"volume normalisation ({method.volume_norm}; SVN for some categories; none: ablation, "
                       "Gaussian NLL training)")
    group.add_argument("--mode", choices=MODES, help=f"backprop engine mode ({method.mode})")
    group.add_argument("--encoder", choices=ENCODERS, help=f"frozen pretrained stem in place of the lift ({method.encoder})")
    group.add_argument("--encoder-weights", metavar="imagenet|PATH",
                       help="weights of --encoder: 'imagenet' (download, needs the encoders extra) or a local state dict")
    if not ablation_switches:  # ablate's variants include SVN and no VN, which a tile cannot serve
        return
    group.add_argument("--backward-tile", type=int, metavar="PX",
                       help="rebuild and backpropagate each coupling in PX x PX tiles of level 0: less memory, more time; "
                       "a multiple of 2**(levels - 1), CVN only (default: off, each level in one piece)")
    ablation = parser.add_argument_group("ablations of the paper's Table 2 (defaults: the method)")
    ablation.add_argument("--template", choices=TEMPLATES, help=f"latent template ({method.template})")
    ablation.add_argument("--difference", choices=DIFFERENCES,
                          help="subtract the template per level then compose (pyramid), or compose first (composed)")
    ablation.add_argument("--loss", choices=LOSSES, help=f"pairwise loss ({method.loss})")
    ablation.add_argument("--loss-p", type=float, metavar="P",
                          help=f"exponent of the loss's latent difference |z_a - z_b|^p, at least 1 ({method.loss_p:g})")


def _add_calibration_options(parser: argparse.ArgumentParser, defaults) -> None:
    from .pixel_threshold import PIXEL_RULES

    group = parser.add_argument_group("decision thresholds (set on held-out good images, never on test data)")
    group.add_argument("--calibration-fraction", type=float, default=defaults.calibration_fraction, metavar="F",
                       help=f"share of train/good held out to set the thresholds ({defaults.calibration_fraction}, "
                       "at least 4 images; 0: none)")
    group.add_argument("--image-fpr", type=float, default=defaults.image_fpr,
                       help=f"target false-positive rate on good parts ({defaults.image_fpr})")
    group.add_argument("--pixel-fpr", type=float, default=defaults.pixel_fpr,
                       help=f"target false-positive rate on good pixels ({defaults.pixel_fpr})")
    group.add_argument("--pixel-rule", choices=PIXEL_RULES, default=defaults.pixel_rule,
                       help="pixel threshold: 'synthetic' fits the mask to defects drawn into the held-out images, "
                            f"never below the 'fpr' threshold; 'fpr' bounds false-positive pixels only ({defaults.pixel_rule})")


def _add_training_options(parser: argparse.ArgumentParser, defaults, what: str = "") -> None:
    """The budget, batch, seed, learning rate, checkpointing and augmentation options that ``train`` and ``ablate`` share."""
    from .data import MVTecDataset
    from .train.config import REFERENCE_EPOCHS

    size = _default_of(MVTecDataset, "size")
    parser.add_argument("--size", type=int, default=size, help=f"image side ({size})")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help=f"training steps{what}")
    budget.add_argument("--epochs", type=int,
                        help=f"passes over the training images{what} ({REFERENCE_EPOCHS} if no budget is given)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"images per training step, at least 2: the loss compares pairs ({defaults.batch_size})")
    parser.add_argument("--seed", type=_seed, default=defaults.seed,
                        help=f"seeds the initial weights, the shuffles and the augmentation ({defaults.seed})")
    parser.add_argument("--lr", type=_learning_rate, default=defaults.lr,
                        help=f"Adam's learning rate ({defaults.lr:g}: the authors')")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, metavar="STEPS",
                        help=f"write checkpoint.pt every STEPS steps, and at the end ({defaults.checkpoint_every})")
    parser.add_argument("--texture", action="store_true",
                        help="declare a category of your own a photographed texture: the texture recipe of "
                             "docs/categories.md (2 pyramid levels; add --augment for flips/rotations)")
    augment = parser.add_mutually_exclusive_group()
    augment.add_argument("--augment", action="store_true",
                         help="random flips/rotations of the training images, for a texture that looks the same "
                              "turned and mirrored")
    augment.add_argument("--no-augment", action="store_true",
                         help="no flips/rotations of texture images (default: on for textures, as the authors)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    from ._utils import DEVICES

    parser.add_argument("--device", default=DEVICES[0], choices=DEVICES, help=f"where to run ({DEVICES[0]}: CUDA when present, else the CPU)")


def _add_bit_depth(parser: argparse.ArgumentParser, default_is: str) -> None:
    parser.add_argument("--bit-depth", type=int, metavar="BITS",
                        help=f"significant bits of 16-bit images, 8..16, e.g. 12 for a 12-bit camera ({default_is})")


def _add_smoothing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smooth", type=float, default=0.0, metavar="SIGMA", help="Gaussian smoothing of the maps, in pixels (0: off)")


def _learning_rate(text: str) -> float:
    """``--lr``: a positive, finite float (Adam takes no other)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _seed(text: str) -> int:
    """``--seed``: a non-negative int (the shuffle's and the data's generators take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _version() -> str:
    """The installed package's version (from its metadata, so it is the one pip installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyramidflow")
    except PackageNotFoundError:
        return "(not installed as a package)"


def build_parser() -> argparse.ArgumentParser:
    from .data import synthetic
    from .engine.drift import DRIFT_POLICIES
    from .experiments.ablation import VARIANTS
    from .experiments.demo import DEMO_SIZE, DEMO_STEPS
    from .inference.export import EXPORT_FORMATS
    from .train import TrainConfig

    defaults = TrainConfig(steps=1)  # the method's settings (the budget is given by the options)
    parser = argparse.ArgumentParser(
        prog="pyramidflow",
        description="PyramidFlow anomaly localisation: train on good images, get anomaly maps and scores.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write the synthetic data set (MVTec layout)")
    synth.add_argument("--out", required=True, type=Path, metavar="ROOT", help="folder to write ROOT/<category>/... into")
    seed, side = _default_of(synthetic.generate, "seed"), _default_of(synthetic.generate, "size")
    synth.add_argument("--seed", type=_seed, default=seed, help=f"the same seed gives the same images ({seed})")
    synth.add_argument("--size", type=int, default=side, help=f"image side in pixels, at least 32 ({side})")
    num_train, num_test = _default_of(synthetic.generate, "num_train"), _default_of(synthetic.generate, "num_test")
    synth.add_argument("--num-train", type=int, default=num_train, help=f"good training images per category ({num_train})")
    synth.add_argument("--num-test", type=int, default=num_test, help=f"test images per defect type, and good ones ({num_test})")

    demo = commands.add_parser("demo", help="synthetic data, training, evaluation and overlays in one go")
    demo.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="folder for the data set (DIR/data), each category's run and overlays, and DIR/metrics.json")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps per category ({DEMO_STEPS})")
    demo.add_argument("--size", type=int, default=DEMO_SIZE, help=f"image side ({DEMO_SIZE})")
    demo.add_argument("--seed", type=_seed, default=defaults.seed,
                      help=f"seeds the synthetic images and the training ({defaults.seed})")
    demo.add_argument("--resume", action="store_true",
                      help="continue a stopped demo in DIR (same --steps, --size, --seed): finished categories are kept")
    _add_device(demo)

    train = commands.add_parser("train", help="train on the good images of one category")
    train.add_argument("--data", required=True, type=Path, metavar="ROOT", help=_DATA_HELP)
    train.add_argument("--category", required=True, help=_CATEGORY_HELP)
    train.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="folder of the run: DIR/checkpoint.pt, DIR/train_log.jsonl (one run per folder)")
    train.add_argument("--layout", choices=LAYOUTS, default="auto", help="data set layout (auto: detect)")
    _add_training_options(train, defaults)
    train.add_argument("--resume", action="store_true", help="continue DIR/checkpoint.pt")
    train.add_argument("--drift", choices=DRIFT_POLICIES, default=defaults.drift,
                       help=f"what backward does when reconstruction drifts ({defaults.drift}: rebuild exactly)")
    _add_calibration_options(train, defaults)
    train.add_argument("--no-plan", action="store_true", help="on CUDA, skip the check that the predicted peak memory fits the GPU")
    _add_bit_depth(train, "default: the file's own, 16; stored in the checkpoint")
    _add_device(train)
    _add_model_options(train)

    plan = commands.add_parser("plan", help="predicted peak training memory per mode, and what fits on a GPU",
                               description="Predicted peak memory of one training step per mode, and what fits on a GPU. "
                               "--encoder resnet18 needs no --encoder-weights here: memory does not depend on the "
                               "weights' values, so plan never reads them (any given are ignored).")  # fmt: skip
    plan.add_argument("--size", type=int, required=True, help="image side")
    plan.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help=f"images per training step, at least 2 ({defaults.batch_size})")
    plan.add_argument("--category", default="", help="take the authors' settings for this category (default: the defaults)")
    plan.add_argument("--gpu-memory", default=None, metavar="BYTES", help="the GPU's memory, e.g. 12GiB: print the largest batch and side that fit")
    plan.add_argument("--json", action="store_true", help="print JSON (predicted_peak_bytes, max_batch_size, max_size)")
    _add_model_options(plan)

    ablate = commands.add_parser("ablate", help="train and evaluate the paper's ablations (Table 2) on one category")
    ablate.add_argument("--data", required=True, type=Path, metavar="ROOT", help=_DATA_HELP)
    ablate.add_argument("--category", required=True, help=_CATEGORY_HELP)
    ablate.add_argument("--out", required=True, type=Path, metavar="DIR", help="DIR/ablation.json, DIR/ablation.md, DIR/<variant>/")
    ablate.add_argument("--layout", choices=LAYOUTS, default="auto", help="data set layout (auto: detect)")
    _add_training_options(ablate, defaults, what=" per variant")
    ablate.add_argument("--variants", nargs="+", metavar="NAME",
                        help=f"{' '.join(v.name for v in VARIANTS)} (default: all)")
    _add_device(ablate)
    _add_model_options(ablate, ablation_switches=False)

    evaluate = commands.add_parser("eval", help="metrics and overlays of a checkpoint on a labelled test set")
    evaluate.add_argument("--checkpoint", required=True, type=Path, help=_CHECKPOINT_HELP)
    evaluate.add_argument("--data", required=True, type=Path, metavar="ROOT", help=_DATA_HELP + " (its test split is read)")
    evaluate.add_argument("--category", required=True, help=_CATEGORY_HELP + "; the checkpoint's own")
    evaluate.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for DIR/metrics.json and DIR/overlays/")
    evaluate.add_argument("--layout", choices=LAYOUTS, default="auto", help="data set layout (auto: detect)")
    _add_bit_depth(evaluate, "default: as in training")
    _add_device(evaluate)
    _add_smoothing(evaluate)
    evaluate.add_argument("--register", action="store_true",
                          help="align each image to the training images first (rotation and translation) using the "
                               "checkpoint's reference, the mean training image (added from --data's training images to "
                               "a checkpoint written without one)")
    evaluate.add_argument("--no-report", action="store_true",
                          help="skip report.html and its plots (a fixed cost, most of it importing matplotlib); "
                               "metrics.json and the overlays are written as ever")

    predict = commands.add_parser("predict", help="anomaly maps and scores of any images")
    predict.add_argument("--checkpoint", required=True, type=Path, help=_CHECKPOINT_HELP)
    predict.add_argument("--out", required=True, type=Path, metavar="DIR",
                         help="folder for DIR/masks/, DIR/maps/, DIR/overlays/, predictions.json and predictions.csv")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER",
                         help="image files, or folders whose images (not subfolders) are read")
    predict.add_argument("--image-threshold", type=float, help="override the calibrated image threshold")
    predict.add_argument("--pixel-threshold", type=float, help="override the calibrated pixel threshold")
    predict.add_argument("--tile", action="store_true",
                         help="images larger than the trained size: overlapping tiles at native resolution")
    _add_bit_depth(predict, "default: as in training")
    _add_device(predict)
    _add_smoothing(predict)
    predict.add_argument("--register", action="store_true",
                         help="align each image to the training images first (the checkpoint's reference, stored by "
                              "train; an older checkpoint needs one run of eval --register)")

    export = commands.add_parser("export", help="the inference graph of a checkpoint as ONNX or TorchScript")
    export.add_argument("--checkpoint", required=True, type=Path, help=_CHECKPOINT_HELP)
    export.add_argument("--out", required=True, type=Path, metavar="FILE", help="e.g. model.onnx or model.pt")
    export.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0], help=f"the graph's format ({EXPORT_FORMATS[0]})")
    export.add_argument("--batch-size", type=_export_batch_size, default=1, metavar="N|dynamic",
                        help="batch size of the graph, or 'dynamic' for any (1)")
    return parser


def _default_of(function, name: str):
    """The default of parameter ``name`` of ``function`` (a class: of its constructor): the library's, not a copy."""
    return inspect.signature(function).parameters[name].default


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


def _dataset(root: Path, category: str, split: str, size, layout: str, bit_depth: Optional[int] = None):
    from .data import BTADDataset, MVTecDataset

    cls = BTADDataset if _layout(root, category, layout) == "btad" else MVTecDataset
    return cls(root, category, split=split, size=size, bit_depth=bit_depth)


def _model_config(args: argparse.Namespace):
    """The category's config with every model option given (the options are named after its fields)."""
    import dataclasses

    from .model import PyramidFlowConfig

    fields = {field.name for field in dataclasses.fields(PyramidFlowConfig)}
    overrides = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    if overrides.get("volume_norm") == "none":
        overrides["volume_norm"] = None
    if getattr(args, "texture", False) and not _in_presets_table(args.category):
        return PyramidFlowConfig.for_texture(**overrides)
    return PyramidFlowConfig.for_category(args.category, **overrides)


def _in_presets_table(category: str) -> bool:
    """Whether the category has a row of its own in docs/categories.md (MVTec AD's and BTAD's classes)."""
    from .data import BTAD_CATEGORIES, MVTEC_CATEGORIES

    return str(category).strip().lower() in MVTEC_CATEGORIES + BTAD_CATEGORIES


def _as_flag(flag: str, call: Callable[[], Any]) -> Any:
    """Run ``call()``; a ValueError it raises names the library's parameter: say which flag set it."""
    try:
        return call()
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def _in_flags(command: str, call: Callable[[], Any]) -> Any:
    """Run ``call()``; an error naming a setting as the library does (``batch_size=1``) names the flag of
    ``command`` that sets it instead (``--batch-size 1``)."""
    try:
        return call()
    except (ValueError, RuntimeError) as error:
        subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        flags = {a.dest: max(a.option_strings, key=len) for a in subcommands.choices[command]._actions if a.option_strings}
        message = re.sub(r"\b(\w+)=", lambda m: f"{flags[m.group(1)]} " if m.group(1) in flags else m.group(0), str(error))
        if message == str(error):
            raise
        raise type(error)(message) from None


def _check_size(size: int, config) -> None:
    config.check_image_size(size, size, where="--size")


def _augment(args: argparse.Namespace, dataset) -> bool:
    """``--augment`` / ``--no-augment``, else the data set's preset (on for known texture categories)."""
    if args.augment or args.no_augment:
        return bool(args.augment)
    return bool(dataset.augment)


def _train_config(args: argparse.Namespace, dataset, **options):
    """The TrainConfig of ``train`` and ``ablate`` from their shared options (``_add_training_options``)."""
    from .train import TrainConfig
    from .train.config import REFERENCE_EPOCHS

    steps, epochs = args.steps, args.epochs
    if steps is None and epochs is None:
        epochs = REFERENCE_EPOCHS
    return TrainConfig(
        steps=steps, epochs=epochs, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
        checkpoint_every=args.checkpoint_every, device=args.device,
        augment=_augment(args, dataset), **options,
    )


# -- commands ----------------------------------------------------------------------------


def _cmd_synth(args: argparse.Namespace) -> None:
    from .data import synthetic

    root = synthetic.generate(args.out, seed=args.seed, size=args.size, num_train=args.num_train, num_test=args.num_test)
    print(f"synthetic data set written to {root} (categories: {', '.join(synthetic.CATEGORIES)})")


def _preflight(args: argparse.Namespace, model_config, train_config) -> None:
    """On CUDA: stop before the first step if the predicted peak memory does not fit the GPU."""
    import torch

    from .memory.plan import WouldNotFitError, preflight
    from ._utils import resolve_device

    device = resolve_device(train_config.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        try:
            _in_flags("train", lambda: preflight(model_config, args.size, train_config.batch_size, total, train_config=train_config))
        except WouldNotFitError as error:
            raise WouldNotFitError(f"{str(error).rstrip('.')} (or --no-plan to try anyway).") from None


def _cmd_plan(args: argparse.Namespace) -> None:
    from .memory.plan import MODES, WEIGHTS_NOT_READ, format_plan, parse_bytes, plan

    if args.encoder not in (None, "none") and args.encoder_weights is None:
        args.encoder_weights = WEIGHTS_NOT_READ  # plan never reads them: NOTE [planning without encoder weights]
    config = _model_config(args)
    memory = _in_flags("plan", lambda: parse_bytes(args.gpu_memory)) if args.gpu_memory is not None else None
    modes = (args.mode,) if args.mode else MODES
    _check_size(args.size, config)
    result = _in_flags("plan", lambda: plan(config, args.size, args.batch_size, modes=modes, gpu_memory=memory, progress=True))
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))


def _cmd_train(args: argparse.Namespace) -> None:
    from .train import train

    model_config = _model_config(args)
    _check_size(args.size, model_config)
    dataset = _dataset(args.data, args.category, "train", args.size, args.layout, args.bit_depth)
    train_config = _train_config(args, dataset, drift=args.drift, calibration_fraction=args.calibration_fraction,
                                 image_fpr=args.image_fpr, pixel_fpr=args.pixel_fpr, pixel_rule=args.pixel_rule)
    if not args.no_plan:
        _preflight(args, model_config, train_config)
    result = train(model_config, train_config, dataset, args.out, resume=args.resume)
    print(f"checkpoint written to {result.checkpoint_path}")


def _cmd_ablate(args: argparse.Namespace) -> None:
    from .experiments.ablation import resolve_variants, run_ablation

    # unknown names fail before any data is read
    variants = [v.name for v in _as_flag("--variants", lambda: resolve_variants(args.variants))]
    base = _model_config(args)
    _check_size(args.size, base)
    train_set = _dataset(args.data, args.category, "train", args.size, args.layout)
    test_set = _dataset(args.data, args.category, "test", args.size, args.layout)
    train_config = _train_config(args, train_set)
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
    from .inference.evaluate import evaluate
    from .inference.maps import load_for_inference
    from ._utils import resolve_device

    inference = load_for_inference(args.checkpoint, resolve_device(args.device))
    bit_depth = inference.bit_depth if args.bit_depth is None else args.bit_depth
    dataset = _dataset(args.data, args.category, "test", inference.image_size, args.layout, bit_depth)
    if args.register and (inference.checkpoint.registration or {}).get("reference") is None:
        from .inference.registration import ensure_reference

        # A checkpoint written before `train` stored the reference: add it once, from the training images.
        train_set = _dataset(args.data, args.category, "train", inference.image_size, args.layout, bit_depth)
        train_set.augment = False
        ensure_reference(inference.checkpoint, train_set)
    report = evaluate(inference, dataset, args.out, smoothing_sigma=args.smooth, category=args.category,
                      register=args.register, report=not args.no_report, plot_worker=args.plot_worker)
    _print_table([report])
    if args.no_report:
        print(f"metrics and overlays written to {args.out}")
    else:
        print(f"metrics, overlays and the page to look at written to {args.out} (open {args.out / 'report.html'})")


def _cmd_predict(args: argparse.Namespace) -> None:
    from .inference.predict import predict
    from .inference.maps import load_for_inference
    from ._utils import resolve_device

    inference = load_for_inference(args.checkpoint, resolve_device(args.device))
    rows = predict(inference, args.inputs, args.out, smoothing_sigma=args.smooth, image_threshold=args.image_threshold,
                   pixel_threshold=args.pixel_threshold, tile=args.tile, bit_depth=args.bit_depth, register=args.register)
    for row in rows:
        verdict = f"ANOMALOUS, {len(row['regions'])} region(s)" if row["is_anomalous"] else "good"
        print(f"{row['score']:10.4f}  {verdict:<26} {row['path']}")
    print(f"masks, maps, overlays, predictions.json, predictions.csv and report.html written to {args.out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .inference.export import ONNX_OPSET, export_checkpoint

    try:
        path = export_checkpoint(args.checkpoint, args.out, format=args.format, batch_size=args.batch_size)
    except ModuleNotFoundError as error:  # the optional `export` extra is missing
        raise RuntimeError(str(error)) from None
    batch = "any" if args.batch_size is None or args.format == "torchscript" else args.batch_size
    opset = f"opset {ONNX_OPSET}, " if args.format == "onnx" else ""
    print(f"{args.format} graph written to {path} ({opset}batch {batch}): ImageNet-normalised images -> anomaly_map, "
          "score (shapes and normalisation in the file's metadata)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .experiments.demo import run_demo

    reports, summary = run_demo(args.out, steps=args.steps, size=args.size, seed=args.seed, device=args.device,
                                resume=args.resume)
    print()
    _print_table(reports + [dict(summary, category="all")])
    print(f"\nmetrics: {args.out / 'metrics.json'}; overlays: {args.out}/<category>/overlays/ ({summary['seconds']} s)")
    print(f"open {args.out / 'report.html'} to see them: each category's figures, linking to its own page")


_COMMANDS = {
    "synth": _cmd_synth, "demo": _cmd_demo, "train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict,
    "plan": _cmd_plan, "export": _cmd_export, "ablate": _cmd_ablate,
}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pyramidflow`` command; returns the exit status."""
    # Before the heavy imports (torch comes with the parser): a stop during them is then one line, and
    # SIGTERM is handled like Ctrl-C by every command (NOTE [light package import] in pyramidflow/__init__.py).
    # The OpenMP wait policy too, which torch's library reads once as it loads (NOTE [OpenMP wait policy]).
    apply_cpu_defaults(warn_if_late=False)
    with InterruptGuard() as guard:
        return _run(argv, guard)


def _early_plot_worker(argv: Sequence[str]) -> Optional["PlotWorker"]:
    """The report's plot process of an ``eval`` that writes the page, started before the parser imports torch.

    Started now, it imports matplotlib on the core torch's import leaves idle
    (:mod:`pyramidflow.inference.plot_worker`). A look at the raw arguments only: where they turn out
    to say otherwise (an abbreviated ``--no-report``, an error), the process is ended unused.
    """
    if not argv or argv[0] != "eval" or {"-h", "--help", "--no-report"} & set(argv):
        return None
    from .inference.plot_worker import PlotWorker

    return PlotWorker()


def _run(argv: Optional[List[str]], guard: InterruptGuard) -> int:
    plot_worker = None
    try:
        plot_worker = _early_plot_worker(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.plot_worker = plot_worker
        guard.raise_swallowed()  # a Ctrl-C during the imports that the import machinery caught
        _COMMANDS[args.command](args)
        guard.raise_swallowed()
    except KeyboardInterrupt as interrupt:
        notes = getattr(interrupt, "__notes__", None)  # what a command kept, and how to go on (add_note)
        print(f"error: {notes[-1] if notes else describe(interrupt)}", file=sys.stderr)
        return exit_status(interrupt)
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        if plot_worker is not None:
            plot_worker.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
