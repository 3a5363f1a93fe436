"""The command line end to end on synthetic data, and its one-line errors."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidflow.checkpoint import load_checkpoint
from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.metrics import pixel_auroc

SIZE = 64
SMALL = ["--channels", "4", "--kernel-size", "3", "--stacks", "2", "--levels", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=1, size=SIZE, num_train=8, num_test=2)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                   "--steps", "4", "--device", "cpu", *SMALL])
    assert status == 0
    return out / "checkpoint.pt"


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_train_eval_predict(trained, data_root, tmp_path, capsys):
    assert trained.is_file()
    assert main(["eval", "--checkpoint", str(trained), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path / "eval"), "--device", "cpu", "--smooth", "1"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("pixel_auroc", "image_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["per_defect_type"]) == set(synthetic.DEFECT_TYPES)
    panels = sorted((tmp_path / "eval" / "overlays").rglob("*.png"))
    assert len(panels) == metrics["num_images"] and Image.open(panels[0]).mode == "RGB"
    assert "pixel AUROC" in capsys.readouterr().out

    images = data_root / "nut" / "test" / "spot"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "pred"), str(images), "--device", "cpu"]) == 0
    scores = json.loads((tmp_path / "pred" / "predictions.json").read_text())["images"]
    assert len(scores) == len(list(images.iterdir()))
    assert len(list((tmp_path / "pred" / "maps").glob("*.png"))) == len(scores)
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == len(scores)
    assert len(list((tmp_path / "pred" / "overlays").rglob("*.png"))) == len(scores)


def test_synth_writes_the_mvtec_layout(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--size", "32", "--seed", "3"]) == 0
    for category in synthetic.CATEGORIES:
        assert any((tmp_path / category / "train" / "good").iterdir())
        assert (tmp_path / category / "ground_truth").is_dir()


def test_missing_data_folder(tmp_path, capsys):
    status = main(["train", "--data", str(tmp_path / "nowhere"), "--category", "nut", "--out", str(tmp_path / "o"), "--steps", "1"])
    assert status != 0
    assert "nowhere" in _error_line(capsys)


def test_size_not_divisible(data_root, tmp_path, capsys):
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", "60", "--steps", "1"])
    assert status != 0
    line = _error_line(capsys)
    assert line.startswith("error: --size: image size 60×60") and "the nearest valid size is 64×64" in line


def test_truncated_image_is_named(data_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root / "nut", root / "nut")
    victim = sorted((root / "nut" / "train" / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    status = main(["train", "--data", str(root), "--category", "nut", "--out", str(tmp_path / "o"), "--size", str(SIZE),
                   "--steps", "8", "--device", "cpu", *SMALL])
    assert status != 0
    assert victim.name in _error_line(capsys)


def test_resume_with_another_config_is_refused(trained, data_root, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained, out / "checkpoint.pt")
    args = ["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE), "--steps", "6",
            "--device", "cpu", "--resume", *SMALL]
    args[args.index("--channels") + 1] = "8"
    assert main(args) != 0
    assert "channels" in _error_line(capsys)


def test_eval_of_unknown_checkpoint(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--data", str(tmp_path), "--category", "nut", "--out", str(tmp_path / "e")]) != 0
    assert str(bad) in _error_line(capsys)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--size", "32", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["categories"]) == set(synthetic.CATEGORIES)
    for key in ("pixel_auroc", "image_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    for category in synthetic.CATEGORIES:
        assert (tmp_path / category / "checkpoint.pt").is_file()
        assert any((tmp_path / category / "overlays").rglob("*.png"))


@pytest.mark.slow
def test_short_training_beats_the_mean_image_baseline_on_the_texture(tmp_path):
    """PyramidFlow's maps must beat the per-pixel distance to the mean training image (issue 4)."""
    size, category = 64, synthetic.TEXTURES[0]
    root = synthetic.generate(tmp_path / "data", seed=2, size=size, categories=(category,), num_train=16, num_test=3)
    assert main(["train", "--data", str(root), "--category", category, "--out", str(tmp_path / "run"), "--size", str(size),
                 "--steps", "60", "--device", "cpu", "--channels", "8", "--kernel-size", "5", "--volume-norm", "SVN"]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data", str(root),
                 "--category", category, "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())["pixel_auroc"]

    train = MVTecDataset(root, category, split="train", size=size, augment=False)
    test = MVTecDataset(root, category, split="test", size=size)
    mean = torch.stack([item["image"] for item in train]).mean(dim=0)
    maps = np.stack([(item["image"] - mean).norm(dim=0).numpy() for item in test])
    masks = np.stack([item["mask"][0].numpy() for item in test])
    baseline = pixel_auroc(maps, masks)
    print(f"pixel AUROC: PyramidFlow {ours:.4f}, mean-image baseline {baseline:.4f}")
    assert ours > baseline, (ours, baseline)


# ----------------------------------------------------------------------------------------------------
# Decisions: calibrated thresholds in eval, masks / regions / CSV from predict, and their one-line errors.


def test_eval_reports_decisions_at_the_calibrated_thresholds(trained, data_root, tmp_path):
    from pyramidflow.checkpoint import load_checkpoint
    from pyramidflow.metrics import image_decision_metrics

    assert main(["eval", "--checkpoint", str(trained), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    calibration = load_checkpoint(trained).calibration
    assert report["image_threshold"] == calibration["image_threshold"] and report["thresholds_from"] == "held-out"
    for key in ("image_precision", "image_recall", "image_f1", "image_fpr", "pixel_f1", "pixel_iou"):
        assert 0.0 <= report[key] <= 1.0, key
    assert len(calibration["held_out"]) == 4  # 8 good training images: 10% but at least 4


def test_predict_writes_masks_regions_and_a_csv(trained, data_root, tmp_path, capsys):
    import csv

    images = data_root / "nut" / "test" / "missing"
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(out), str(images), "--device", "cpu",
                 "--pixel-threshold", "0"]) == 0
    report = json.loads((out / "predictions.json").read_text())
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["path"] for r in rows] == [r["path"] for r in report["images"]] and report["pixel_threshold"] == 0.0
    for row, image in zip(report["images"], rows):
        mask = np.asarray(Image.open(out / "masks" / f"{Path(row['path']).stem}.png"))
        assert mask.shape == (SIZE, SIZE) and (mask == 255).all()  # threshold 0: every pixel is above it
        assert row["regions"] == [{"bbox": [0, 0, SIZE, SIZE], "area": SIZE * SIZE, "peak": row["regions"][0]["peak"]}]
        assert int(image["num_regions"]) == 1 and int(image["is_anomalous"]) == int(row["is_anomalous"])
    assert "region(s)" in capsys.readouterr().out or not any(r["is_anomalous"] for r in report["images"])


def test_predict_errors_are_one_line(trained, data_root, tmp_path, capsys):
    good = data_root / "nut" / "test" / "good" / "000.png"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:200])  # a truncated PNG: the header reads, the pixels do not
    base = ["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "p"), "--device", "cpu"]
    assert main(base + [str(corrupt)]) == 1
    assert "corrupt.png" in _error_line(capsys)
    small = tmp_path / "small.png"
    Image.new("RGB", (SIZE - 8, SIZE + 16)).save(small)
    assert main(base + ["--tile", str(small)]) == 1
    assert f"at least the trained size {SIZE}x{SIZE}" in _error_line(capsys)
    assert main(base + ["--image-threshold", "-2", str(good)]) == 1
    assert "--image-threshold -2.0 is outside the score range" in _error_line(capsys)
    assert main(base + ["--pixel-threshold", "nan", str(good)]) == 1
    assert "--pixel-threshold nan is outside the score range" in _error_line(capsys)


@pytest.mark.parametrize("stop, status, said", [
    (KeyboardInterrupt, 130, "predict: interrupted after 3 of"),
    ("SIGTERM", 143, "predict: terminated (SIGTERM) after 3 of"),
])
def test_predict_stopped_writes_the_rows_of_the_finished_images(trained, data_root, tmp_path, monkeypatch, capsys,
                                                                stop, status, said):
    import csv
    import signal

    import pyramidflow.inference.outputs as outputs
    from pyramidflow.train.interrupts import TrainingTerminated

    images = sorted((data_root / "nut" / "test").rglob("*.png"))
    total = len(images)
    overlays, real_overlay = [], outputs.overlay_panel

    def stopped_at_the_fourth_image(*args, **kwargs):
        overlays.append(1)
        if len(overlays) == 4:
            raise KeyboardInterrupt() if stop is KeyboardInterrupt else TrainingTerminated(signal.SIGTERM)
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(outputs, "overlay_panel", stopped_at_the_fourth_image)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(out), *map(str, images), "--device", "cpu"]) == status
    lines = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if line.strip()]
    line = lines[-1]  # above it, at most the progress bar of a slow machine
    assert [x for x in lines if not re.match(r"predict:\s+\d+%\|", x)] == [line] and line.startswith("error: ")
    assert said in line and f"of {total} images" in line and str(out / "predictions.json") in line
    report = json.loads((out / "predictions.json").read_text())
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(report["images"]) == len(rows) == 3
    assert [r["path"] for r in rows] == [r["path"] for r in report["images"]]
    for row in report["images"]:
        assert all((out / row[kind]).is_file() for kind in ("mask", "map", "overlay"))
    assert not list(out.rglob("*.tmp"))


def test_train_with_too_few_images_to_hold_out_is_one_line(data_root, tmp_path, capsys):
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path), "--size", str(SIZE),
                 "--steps", "1", "--device", "cpu", "--calibration-fraction", "0.9", *SMALL]) == 1
    assert "--calibration-fraction 0" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------------
# predict: one output per input, rows that point at their files, safe names and cells, the bar.


def test_predict_gives_inputs_of_the_same_name_their_own_outputs(trained, data_root, tmp_path):
    import csv

    from pyramidflow import Detector

    inputs = [data_root / "nut" / "test" / kind / f"{i:03d}.png" for kind in ("good", "spot") for i in range(2)]
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(out), *map(str, inputs), "--device", "cpu",
                 "--pixel-threshold", "0.05"]) == 0
    rows = json.loads((out / "predictions.json").read_text())["images"]
    assert [r["path"] for r in rows] == list(map(str, inputs))
    assert [r["mask"] for r in rows] == ["masks/good/000.png", "masks/good/001.png", "masks/spot/000.png", "masks/spot/001.png"]
    assert len(list((out / "masks").rglob("*.png"))) == len(list((out / "overlays").rglob("*.png"))) == len(inputs)
    detector = Detector.load(trained, device="cpu")
    detector.pixel_threshold = 0.05
    for row, prediction in zip(rows, detector(inputs)):
        assert np.array_equal(np.asarray(Image.open(out / row["mask"])) > 0, prediction.mask), row
        assert (out / row["map"]).is_file() and (out / row["overlay"]).is_file()
    table = list(csv.DictReader(open(out / "predictions.csv")))
    assert [(r["path"], r["mask"], r["map"], r["overlay"]) for r in table] == [
        (r["path"], r["mask"], r["map"], r["overlay"]) for r in rows]


def test_output_names_are_unique_and_stable():
    from pyramidflow.inference.outputs import output_names

    assert output_names(["in/a.png", "in/b.png"]) == ["a", "b"]
    assert output_names(["in/crack/000.png", "in/good/000.png"]) == ["crack/000", "good/000"]
    # Names that differ only in case would merge on a case-insensitive file system; one file given twice.
    assert output_names(["x/a.png", "x/a.bmp", "x/A.png", "x/a.png"]) == ["a.png", "a.bmp", "A.png~2", "a.png~3"]
    assert output_names(["x/..png", "x/...png"]) == ["..png", "...png"]  # never a "." or ".." name


def test_predict_writes_every_output_of_a_file_named_dot_dot_png(trained, data_root, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "..png").write_bytes((data_root / "nut" / "test" / "good" / "000.png").read_bytes())
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(out), str(folder), "--device", "cpu"]) == 0
    [row] = json.loads((out / "predictions.json").read_text())["images"]
    assert row["mask"] == "masks/..png.png"
    for kind in ("mask", "map", "overlay"):
        assert Image.open(out / row[kind]).format == "PNG"


def test_predict_csv_cells_cannot_start_a_formula(trained, data_root, tmp_path, monkeypatch):
    import csv

    monkeypatch.chdir(tmp_path)
    for name in ("=1+2.png", "+a.png", "-b.png", "@c.png"):
        (tmp_path / name).write_bytes((data_root / "nut" / "test" / "good" / "000.png").read_bytes())
    assert main(["predict", "--checkpoint", str(trained), "--out", "pred", "--device", "cpu",
                 "--", "=1+2.png", "+a.png", "-b.png", "@c.png"]) == 0
    table = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [r["path"] for r in table] == ["'=1+2.png", "'+a.png", "'-b.png", "'@c.png"]
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["images"][0]["path"] == "=1+2.png"


def test_predict_progress_ticks_when_an_image_is_done(trained, data_root, tmp_path, monkeypatch):
    """Not when it is read: the bar must not say 4/4 while the work is still ahead."""
    import pyramidflow.inference.outputs as decisions
    import tqdm.auto

    from pyramidflow.inference.maps import load_for_inference
    from pyramidflow.inference.predict import predict

    class Bar:
        last = None

        def __init__(self, iterable=None, **options):
            self.iterable, self.n = iterable, 0
            Bar.last = self

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.n += 1

        def update(self, n=1):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

    ticks_at_write, save = [], decisions.save_panel

    def saving(panel, path):
        if "masks" in Path(path).parts:
            ticks_at_write.append(Bar.last.n)
        save(panel, path)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(decisions, "save_panel", saving)
    images = sorted((data_root / "nut" / "test" / "good").iterdir()) + sorted((data_root / "nut" / "test" / "spot").iterdir())
    predict(load_for_inference(trained, torch.device("cpu")), images, tmp_path / "pred")
    assert ticks_at_write == list(range(len(images))) and Bar.last.n == len(images)


@pytest.mark.parametrize("sigma", ["1e9", "-1", "nan"])
def test_smooth_out_of_range_is_one_line_naming_it(trained, data_root, tmp_path, capsys, sigma):
    good = data_root / "nut" / "test" / "good" / "000.png"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "p"), str(good), "--device", "cpu",
                 "--smooth", sigma]) == 1
    assert f"smoothing_sigma (--smooth) must be a number of pixels from 0 (off) to {SIZE}" in _error_line(capsys)
    assert main(["eval", "--checkpoint", str(trained), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path / "e"), "--device", "cpu", "--smooth", sigma]) == 1
    assert "(--smooth)" in _error_line(capsys)


def test_an_image_too_large_to_open_is_one_line_naming_it(trained, tmp_path, capsys):
    from data.test_data import _too_large_png

    huge = _too_large_png(tmp_path / "huge.png")
    assert main(["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "p"), str(huge), "--device", "cpu"]) == 1
    assert f"image {huge} is too large to open" in _error_line(capsys)


def test_bit_depth_flag(trained, data_root, tmp_path, capsys):
    good = data_root / "nut" / "test" / "good" / "000.png"
    assert main(["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "p"), str(good), "--device", "cpu",
                 "--bit-depth", "20"]) == 1
    assert "bit_depth (--bit-depth) must be" in _error_line(capsys)
    bright = tmp_path / "bright.png"
    Image.fromarray(np.full((SIZE, SIZE), 5000, dtype=np.uint16)).save(bright)
    assert main(["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "p"), str(bright), "--device", "cpu",
                 "--bit-depth", "12"]) == 1
    assert f"{bright} holds pixel values up to 5000" in _error_line(capsys)
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path / "t"), "--size", str(SIZE),
                 "--steps", "1", "--device", "cpu", "--bit-depth", "7", *SMALL]) == 1
    assert "bit_depth (--bit-depth) must be" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------------
# Runs that must match their data (issue 19, item 5 and 7) and the flags around them.


def _copy_run(trained, tmp_path):
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained, out / "checkpoint.pt")
    return out


@pytest.mark.parametrize("flag, value, named", [
    ("--category", "pcb", "category 'nut' (checkpoint) vs 'pcb' (this run, --category)"),
    ("--data", None, "(this run, --data)"),
    ("--size", "32", "image_size [64, 64] (checkpoint) vs [32, 32] (this run, --size)"),
])
def test_resume_on_other_data_is_refused(trained, data_root, tmp_path, capsys, flag, value, named):
    import shutil

    out = _copy_run(trained, tmp_path)
    if flag == "--data":  # the same images under another root: still another data set
        value = str(tmp_path / "elsewhere")
        shutil.copytree(data_root / "nut", Path(value) / "nut")
    args = ["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
            "--steps", "6", "--device", "cpu", "--resume", *SMALL]
    args[args.index(flag) + 1] = value
    before = (out / "checkpoint.pt").read_bytes()
    assert main(args) == 1
    line = _error_line(capsys)
    assert "cannot resume from" in line and named in line and "--out" in line, line
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_of_an_svn_model_at_another_size_is_refused(data_root, tmp_path, capsys):
    args = ["train", "--data", str(data_root), "--category", "fabric", "--out", str(tmp_path / "svn"), "--steps", "2",
            "--device", "cpu", "--volume-norm", "SVN", *SMALL]
    assert main([*args, "--size", str(SIZE)]) == 0
    capsys.readouterr()
    assert main([*args, "--size", "32", "--resume"]) == 1
    assert "image_size [64, 64] (checkpoint) vs [32, 32] (this run, --size)" in _error_line(capsys)


def test_eval_with_another_categorys_checkpoint_is_refused(trained, data_root, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(trained), "--data", str(data_root), "--category", "pcb",
                 "--out", str(out), "--device", "cpu"]) == 1
    line = _error_line(capsys)
    assert "trained on category 'nut' but the test set is 'pcb' (--category)" in line and "--category nut" in line
    assert not (out / "metrics.json").exists()


def test_damaged_held_out_image_is_named_before_the_first_step(data_root, tmp_path, capsys, monkeypatch):
    import shutil

    import pyramidflow.train.loop as train_loop
    from pyramidflow.calibration import calibration_split

    root = tmp_path / "data"
    shutil.copytree(data_root / "nut", root / "nut")
    images = sorted((root / "nut" / "train" / "good").iterdir())
    _, held_out = calibration_split(len(images), 0.1, seed=0)
    victim = images[held_out[-1]]
    victim.write_bytes(victim.read_bytes()[:200])  # the header reads, the pixels do not decode
    def no_step(self, *args):
        raise AssertionError("a training step ran before the damaged image was found")

    monkeypatch.setattr(train_loop._Run, "train_step", no_step)
    out = tmp_path / "o"
    assert main(["train", "--data", str(root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "4", "--device", "cpu", *SMALL]) == 1
    line = _error_line(capsys)
    assert str(victim) in line and "cannot decode" in line, line
    assert not out.exists()  # the folder this run made is gone


def test_failed_train_keeps_a_folder_it_did_not_create(data_root, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "1", "--device", "cpu", "--calibration-fraction", "0.9", *SMALL]) == 1
    _error_line(capsys)
    assert out.is_dir() and list(out.iterdir()) == []


def test_negative_seed_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--category", "nut", "--out", str(tmp_path / "o"), "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: expected a non-negative integer, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-0.001", "nan", "fast"])
def test_bad_learning_rate_names_the_flag(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--category", "nut", "--out", str(tmp_path / "o"), "--lr", value])
    assert exit_info.value.code == 2
    assert f"argument --lr: expected a positive number, got {value!r}" in capsys.readouterr().err


def test_learning_rate_reaches_the_optimizer_and_the_checkpoint(data_root, tmp_path):
    out = tmp_path / "lr"
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "1", "--device", "cpu", *SMALL, "--lr", "0.003"]) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.train_config["lr"] == 0.003
    assert {group["lr"] for group in checkpoint.optimizer["param_groups"]} == {0.003}


def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyramidflow {version('pyramidflow')}"


@pytest.mark.parametrize("category, flags, expected", [
    ("nut", [], False), ("nut", ["--augment"], True), ("fabric", [], True), ("fabric", ["--no-augment"], False),
    ("nut", ["--texture"], False), ("nut", ["--texture", "--augment"], True), ("fabric", ["--texture"], True),
])
def test_augment_flags_and_the_category_preset(data_root, tmp_path, monkeypatch, category, flags, expected):
    import pyramidflow.train as train_module

    seen = []

    def fake_train(model_config, train_config, dataset, out_dir, resume=False):
        seen.append(train_config.augment)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_module, "train", fake_train)
    assert main(["train", "--data", str(data_root), "--category", category, "--out", str(tmp_path / "o"),
                 "--size", str(SIZE), "--steps", "1", "--device", "cpu", *flags, *SMALL]) == 1
    assert seen == [expected]


def test_augment_and_no_augment_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", "d", "--category", "c", "--out", "o", "--augment", "--no-augment"])
    assert "not allowed with argument" in capsys.readouterr().err


# -- --backward-tile ------------------------------------------------------------------------------


def test_train_backward_tile_reaches_the_model_and_the_checkpoint(data_root, tmp_path):
    out = tmp_path / "tiled"
    status = main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                   "--steps", "1", "--device", "cpu", *SMALL, "--backward-tile", "16"])
    assert status == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.model_config["backward_tile"] == 16
    assert {block.tile for block in checkpoint.build_model().flow.modules() if hasattr(block, "tile")} == {16}


def test_plan_backward_tile_plans_the_tiled_step(capsys):
    from pyramidflow.memory.plan import predict_peak
    from pyramidflow.model import PyramidFlowConfig

    assert main(["plan", "--size", str(SIZE), *SMALL, "--mode", "invertible", "--backward-tile", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backward_tile"] == 16
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=3, backward_tile=16)
    assert out["predicted_peak_bytes"]["invertible"] == predict_peak(config, SIZE, out["batch_size"]).peak
    assert main(["plan", "--size", str(SIZE), *SMALL, "--mode", "invertible", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backward_tile"] is None


@pytest.mark.parametrize("flags, named", [
    (["--backward-tile", "6"], "multiple of 2**(num_levels - 1) = 4 pixels so that every level's tile edges are whole pixels, got 6; use 8."),
    (["--backward-tile", "8", "--volume-norm", "SVN"], "backward_tile needs volume_norm='CVN', got 'SVN'"),
    (["--backward-tile", "8", "--volume-norm", "none"], "backward_tile needs volume_norm='CVN', got None"),
])
@pytest.mark.parametrize("command", ["plan", "train"])
def test_bad_backward_tile_is_one_line(command, flags, named, tmp_path, capsys):
    where = ["--size", str(SIZE)] if command == "plan" else [
        "--data", str(tmp_path), "--category", "nut", "--out", str(tmp_path / "run"), "--size", str(SIZE), "--device", "cpu"]
    assert main([command, *where, *SMALL, *flags]) == 1
    assert named in _error_line(capsys)


def test_every_option_says_what_it_is_and_its_default():
    import argparse

    from pyramidflow.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"pyramidflow {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            default = action.default
            if default is None or isinstance(default, bool):
                continue
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"({shown}" in action.help or f"({shown}:" in action.help, f"{where}: default {default!r} not shown"
    tile = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                if "--backward-tile" in a.option_strings)
    assert "None" not in tile.help
