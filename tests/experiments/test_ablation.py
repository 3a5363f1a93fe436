"""`pyramidflow ablate` and the ablation switches through the command line, on tiny synthetic data."""

import json

import pytest
import torch

import pyramidflow.train as train_module
from pyramidflow.experiments.ablation import PAPER_TABLE_2, VARIANTS, run_ablation, variant_config
from pyramidflow.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint_atomic
from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train import TrainConfig

SIZE = 32
SMALL = ["--channels", "4", "--kernel-size", "3", "--stacks", "1", "--levels", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=1, size=SIZE, num_train=8, num_test=1,
                              categories=("nut", "fabric"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "flags, field, value",
    [
        (["--volume-norm", "none"], "volume_norm", None),
        (["--template", "zero"], "template", "zero"),
        (["--difference", "composed"], "difference", "composed"),
        (["--loss", "spatial"], "loss", "spatial"),
    ],
)
def test_each_switch_trains_and_evaluates_through_the_cli(flags, field, value, data_root, tmp_path, monkeypatch):
    import pyramidflow.model.loss as loss_module

    trained_with = []  # the training objective actually called, per step
    for name in ("fourier_loss", "spatial_loss", "gaussian_nll"):
        real = getattr(loss_module, name)
        monkeypatch.setattr(loss_module, name, lambda *a, _n=name, _f=real, **k: trained_with.append(_n) or _f(*a, **k))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "2", "--device", "cpu", *SMALL, *flags]) == 0
    expected = {"volume_norm": "gaussian_nll", "loss": "spatial_loss"}.get(field, "fourier_loss")
    assert trained_with == [expected, expected]
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt.model_config[field] == value  # recorded in the checkpoint
    others = {"volume_norm": "CVN", "template": "mean", "difference": "pyramid", "loss": "fourier"}
    del others[field]
    assert {k: ckpt.model_config[k] for k in others} == others, "one switch changes one setting"
    if field == "template":
        assert all(not level.any() for level in ckpt.template)
    assert main(["eval", "--checkpoint", str(out / CHECKPOINT_NAME), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0


def test_no_augment_is_recorded_and_textures_augment_by_default(data_root, tmp_path):
    for name, extra, expected in (("default", [], True), ("off", ["--no-augment"], False)):
        out = tmp_path / name
        assert main(["train", "--data", str(data_root), "--category", "fabric", "--out", str(out), "--size", str(SIZE),
                     "--steps", "2", "--device", "cpu", *SMALL, *extra]) == 0
        assert load_checkpoint(out / CHECKPOINT_NAME).train_config["augment"] is expected
    out = tmp_path / "object"
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "2", "--device", "cpu", *SMALL]) == 0
    assert load_checkpoint(out / CHECKPOINT_NAME).train_config["augment"] is False


def test_augmented_training_resumes_bit_for_bit(data_root, tmp_path):
    """Texture augmentation draws from the RNG the checkpoint saves: 3 steps + resume to 6 == 6 steps."""
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3)

    def run(out, steps, resume=False, augment=None):
        dataset = MVTecDataset(data_root, "fabric", split="train", size=SIZE)
        settings = TrainConfig(steps=steps, checkpoint_every=None, device="cpu", augment=augment)
        return train_module.train(config, settings, dataset, out, resume=resume, progress=False)

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "split", 3)
    resumed = run(tmp_path / "split", 6, resume=True)
    assert resumed.losses == whole.losses
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
    plain = run(tmp_path / "plain", 6, augment=False)
    assert plain.losses != whole.losses, "augmentation must change the trajectory (the test is not vacuous)"


def test_checkpoint_without_the_new_settings_still_loads_and_resumes(data_root, tmp_path):
    out = tmp_path / "old"
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "2", "--device", "cpu", *SMALL]) == 0
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    for key in ("template", "difference", "loss"):
        del state["model_config"][key]
    del state["train_config"]["augment"]
    save_checkpoint_atomic(state, out / CHECKPOINT_NAME)
    assert main(["eval", "--checkpoint", str(out / CHECKPOINT_NAME), "--data", str(data_root), "--category", "nut",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert main(["train", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
                 "--steps", "3", "--device", "cpu", "--resume", *SMALL]) == 0
    assert load_checkpoint(out / CHECKPOINT_NAME).step == 3


def test_variant_configs_change_one_setting_each():
    base = PyramidFlowConfig()
    for variant in VARIANTS:
        config = variant_config(base, variant)
        changed = {k for k in ("volume_norm", "template", "difference", "loss") if getattr(config, k) != getattr(base, k)}
        assert changed == {k for k, _ in variant.overrides}, variant.name
    assert set(PAPER_TABLE_2) == {v.name for v in VARIANTS}


def test_ablate_writes_the_table_and_resumes_without_retraining(data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ablation"
    args = ["ablate", "--data", str(data_root), "--category", "nut", "--out", str(out), "--size", str(SIZE),
            "--steps", "2", "--device", "cpu", "--variants", "baseline", "zero_template", *SMALL]
    calls = []
    real_train = train_module.train

    def spy(*a, **k):
        calls.append(k.get("resume"))
        return real_train(*a, **k)

    monkeypatch.setattr(train_module, "train", spy)
    assert main(args) == 0
    assert calls == [False, False]
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == ["baseline", "zero_template"]
    for name, row in rows.items():
        for key in ("pixel_auroc", "aupro", "image_auroc"):
            assert 0.0 <= row[key] <= 1.0
        assert row["peak_memory_bytes"] > 0 and row["train_seconds"] >= 0
        assert (row["paper_pixel_auroc"], row["paper_aupro"]) == PAPER_TABLE_2[name]
    assert rows["zero_template"]["pixel_auroc"] != rows["baseline"]["pixel_auroc"]
    table = (out / "ablation.md").read_text()
    assert "| baseline |" in table and "| zero_template |" in table and "paper: pixel AUROC" in table
    assert "95.5" in table and "91.5" in table

    # Finished variants are skipped; a variant with only a checkpoint (interrupted) resumes from it.
    (out / "zero_template" / "result.json").unlink()
    calls.clear()
    assert main(args) == 0
    assert calls == [True]
    assert "table written" in capsys.readouterr().out


def test_ablate_refuses_unknown_variants_and_other_settings(data_root, tmp_path, capsys):
    args = ["ablate", "--data", str(data_root), "--category", "nut", "--out", str(tmp_path / "a"), "--size", str(SIZE),
            "--steps", "1", "--device", "cpu", *SMALL]
    assert main(args + ["--variants", "baseline", "no_template"]) != 0
    assert "no_template" in _error_line(capsys)
    with pytest.raises(ValueError, match="baseline must be the method"):
        run_ablation(PyramidFlowConfig(template="zero"), TrainConfig(steps=1), [], [], tmp_path / "b")
    assert main(args + ["--variants", "baseline"]) == 0
    capsys.readouterr()
    args[args.index("--steps") + 1] = "2"
    assert main(args + ["--variants", "baseline"]) != 0
    assert "other settings" in _error_line(capsys)
