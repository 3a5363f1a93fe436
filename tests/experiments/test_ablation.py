"""The paper's ablation (Table 2): each switch changes what it says, and only that (model level); each
trains and evaluates through the command line; and `pyramidflow ablate` runs them all, on tiny synthetic data."""

import copy
import json

import pytest
import torch
from torch.autograd.functional import jacobian

import pyramidflow.train as train_module
from pyramidflow.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint_atomic
from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.experiments.ablation import PAPER_TABLE_2, VARIANTS, run_ablation, variant_config
from pyramidflow.model import (
    PyramidFlow,
    PyramidFlowConfig,
    anomaly_map,
    fit_template,
    fourier_loss,
    laplacian_compose,
    pairwise_difference_maps,
)
from pyramidflow.model.anomaly_map import SPREAD_FLOOR
from pyramidflow.model.loss import gaussian_nll, objective_loss, spatial_loss
from pyramidflow.train import TrainConfig

from model.test_blocks import BLOCKS, pyramid  # the block kinds and pyramids the block tests use (tests/model/)

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64


def perturb(module, std=0.3):
    """Move every coupling away from its identity init, and every 1×1 conv away from |det W| = 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("conv_out.weight") or name.endswith("log_diagonal") or name.endswith("lower"):
                p.normal_(0.0, std)
    return module


def small(**overrides):
    settings = dict(channels=4, kernel_size=3, num_stacks=2, num_levels=3)
    settings.update(overrides)
    return PyramidFlowConfig(**settings)


# -- volume_norm=None: the flow changes volume and says by how much -----------------------------------


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_without_volume_norm_returns_its_exact_logdet(kind):
    """Per sample, logdet equals log|det| of the brute-force Jacobian; inverse returns minus it."""
    block = perturb(BLOCKS[kind](2, kernel_size=3, volume_norm=None).to(DTYPE))
    xs = pyramid(channels=2, size=4)
    ys, logdet = block(xs)
    assert logdet.shape == (2,) and logdet.abs().min() > 1e-3
    shapes, sizes = [x[:1].shape for x in xs], [x[:1].numel() for x in xs]
    for n in range(2):
        def one_sample(flat):
            parts = [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes)]
            out, _ = block(tuple(p if n == 0 else torch.cat([x[:1], p]) for p, x in zip(parts, xs)))
            return torch.cat([y[n].reshape(-1) for y in out])

        flat = torch.cat([x[n].reshape(-1) for x in xs])
        jac = jacobian(one_sample, flat)
        torch.testing.assert_close(logdet[n], torch.linalg.slogdet(jac).logabsdet, rtol=1e-9, atol=1e-9)
    rebuilt, logdet_inverse = block.inverse(ys)
    torch.testing.assert_close(logdet_inverse, -logdet)
    for a, b in zip(rebuilt, xs):
        torch.testing.assert_close(a, b)


def test_model_without_volume_norm_has_a_nonzero_logdet_and_with_it_none():
    images = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    free = perturb(PyramidFlow(small(volume_norm=None)).double(), std=0.05)
    _, logdet = free(images, return_logdet=True)
    assert logdet.abs().min() > 1e-2
    assert all(not block.volume_preserving for block in free.flow.blocks)
    assert all(block.volume_norm.running_mean.numel() == 0 or block.volume_norm.running_mean.abs().sum() == 0
               for block in free.flow.blocks), "no VN: no running mean is kept"
    normalised = perturb(PyramidFlow(small()).double(), std=0.05)
    _, zero = normalised(images, return_logdet=True)
    assert torch.equal(zero, torch.zeros(2, dtype=DTYPE))


def test_gaussian_nll_gradients_agree_across_engine_modes():
    """The engine carries the log-det through invertible backprop: the NLL's gradient equals autograd's."""
    model = perturb(PyramidFlow(small(volume_norm=None, num_stacks=1)).double(), std=0.05)
    images = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    grads = {}
    for mode in ("autograd", "invertible", "checkpoint"):
        copy_ = copy.deepcopy(model)
        copy_.mode = mode
        gaussian_nll(*copy_(images, return_logdet=True)).backward()
        grads[mode] = [p.grad for p in copy_.parameters() if p.requires_grad]
    for mode in ("invertible", "checkpoint"):
        for a, b in zip(grads[mode], grads["autograd"]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads["autograd"] if g is not None)


def test_gaussian_nll_is_the_per_dimension_negative_log_likelihood():
    latents = (torch.randn(2, 3, 4, 4, dtype=DTYPE), torch.randn(2, 3, 2, 2, dtype=DTYPE))
    logdet = torch.tensor([0.7, -1.3], dtype=DTYPE)
    z = torch.cat([x.flatten(1) for x in latents], dim=1)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = (-(normal.log_prob(z).sum(dim=1) + logdet) / z.shape[1]).mean()
    torch.testing.assert_close(gaussian_nll(latents, logdet), expected)
    with pytest.raises(ValueError, match="logdet"):
        objective_loss("gaussian_nll", latents)


def test_objective_follows_volume_norm_and_loss():
    assert small().objective == "fourier"
    assert small(loss="spatial").objective == "spatial"
    assert small(volume_norm=None).objective == "gaussian_nll"
    with pytest.raises(ValueError, match="loss='spatial' needs volume normalisation"):
        small(volume_norm=None, loss="spatial")
    with pytest.raises(ValueError, match="loss_p=1 needs volume normalisation"):
        small(volume_norm=None, loss_p=1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(template="median"), "template must be one of"),
        (dict(difference="first"), "difference must be one of"),
        (dict(loss="l1"), "loss must be one of"),
        (dict(volume_norm="none"), "volume_norm must be one of"),
        (dict(loss_p=0.5), "loss_p must be a number of at least 1"),
        (dict(loss_p=float("nan")), "loss_p must be a number of at least 1"),
        (dict(loss_p="1"), "loss_p must be a number of at least 1"),
    ],
)
def test_switches_refuse_unknown_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        small(**overrides)


# -- template="zero": the map is the latent's own magnitude --------------------------------------------


def test_zero_template_gives_the_raw_latent_magnitude():
    model = perturb(PyramidFlow(small()), std=0.05)
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(images)  # one training forward sets the running means
    template = fit_template(model, [images[:2], images[2:]], kind="zero")
    mean_template = fit_template(model, [images[:2], images[2:]])
    assert all(t.shape == m.shape and not t.any() for t, m in zip(template, mean_template))
    assert any(m.abs().sum() > 0 for m in mean_template)
    model.eval()
    with torch.no_grad():
        latents = model(images)
    expected = laplacian_compose([z.abs().mean(dim=1, keepdim=True) for z in latents])
    torch.testing.assert_close(anomaly_map(latents, template), expected)
    assert not torch.allclose(anomaly_map(latents, mean_template), expected)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_template(model, [images], kind="median")


# -- template="constant": the mean's spatial mean, for stationary textures ----------------------------------


def _model_and_templates(num_images: int, kind: str):
    """A perturbed model after one training forward, ``num_images`` random images, and its mean and ``kind`` templates."""
    model = perturb(PyramidFlow(small()), std=0.05)
    images = torch.randn(num_images, 3, 8, 12)
    with torch.no_grad():
        model(images)  # one training forward sets the running means
    batches = [images[:2], images[2:]]
    return model, images, fit_template(model, batches), fit_template(model, batches, kind=kind)


def test_constant_template_is_the_spatial_mean_of_the_mean_template_per_level_and_channel():
    _, _, mean_template, template = _model_and_templates(4, "constant")
    for t, m in zip(template, mean_template):
        assert t.shape == m.shape and t.dtype == m.dtype
        expected = m.double().flatten(2).mean(-1)  # (1, C), computed apart from the library's keepdim/expand
        torch.testing.assert_close(t.double()[..., 0, 0], expected)
        torch.testing.assert_close(t.double()[..., -1, -1], expected)
        assert (t == t[..., :1, :1]).all()
        assert not torch.equal(t, m)  # the mean template varies over space here


# -- template="scaled": deviations divided by the training latents' spread ----------------------------------


def test_scaled_template_holds_the_mean_and_the_floored_spread_and_divides_the_deviation():
    model, images, mean_template, template = _model_and_templates(5, "scaled")
    model.eval()
    with torch.no_grad():
        latents = model(images)
    for t, m, z in zip(template, mean_template, latents):
        assert t.shape == (2,) + tuple(m.shape[1:]) and t.dtype == m.dtype
        torch.testing.assert_close(t[:1], m)
        spread = z.double().std(dim=0, unbiased=False, keepdim=True)  # computed apart from the library's moments
        expected = spread.clamp_min(SPREAD_FLOOR * float(spread.mean()))
        torch.testing.assert_close(t[1:].double(), expected, rtol=1e-4, atol=1e-6)
    expected = laplacian_compose([((z - t[:1]) / t[1:]).abs().mean(dim=1, keepdim=True) for z, t in zip(latents, template)])
    scaled = anomaly_map(latents, template)
    torch.testing.assert_close(scaled, expected)
    assert not torch.allclose(scaled, anomaly_map(latents, mean_template)), "the spread must change the map"


class _Fixed(torch.nn.Module):
    """Returns the same latent pyramid for any images: a model for fit_template with known latents."""

    def __init__(self, latents):
        super().__init__()
        self.latents = latents

    def forward(self, images):
        return self.latents


def test_a_latent_that_never_varies_gets_the_floor_not_a_zero_spread():
    finest = torch.ones(4, 2, 8, 8, dtype=DTYPE)
    finest[:, :, :4] = torch.randn(4, 2, 4, 8, dtype=DTYPE)  # the top half varies, the bottom half never does
    latents = (finest, torch.randn(4, 2, 4, 4, dtype=DTYPE))
    template = fit_template(_Fixed(latents), [torch.zeros(4, 3, 8, 8)], device="cpu", kind="scaled")
    spread = template[0][1]
    floor = SPREAD_FLOOR * float(finest.std(dim=0, unbiased=False).mean())
    torch.testing.assert_close(spread[:, 4:], torch.full_like(spread[:, 4:], floor))
    assert (spread[:, :4] > floor).float().mean() > 0.9
    shifted = anomaly_map(tuple(z + 1.0 for z in latents), template)
    assert torch.isfinite(shifted).all()


def test_a_template_of_a_wrong_shape_is_refused():
    latents = (torch.randn(3, 2, 8, 8, dtype=DTYPE), torch.randn(3, 2, 4, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"expected \(1, C, H, W\)"):
        anomaly_map(latents, tuple(torch.zeros(3, 2, 8 // 2**i, 8 // 2**i, dtype=DTYPE) for i in range(2)))


# -- difference="composed": compose first, then subtract ------------------------------------------------


def test_composed_difference_equals_composing_first():
    latents = tuple(torch.randn(3, 4, 16 // 2**i, 16 // 2**i, dtype=DTYPE) for i in range(3))
    template = tuple(torch.randn(1, 4, 16 // 2**i, 16 // 2**i, dtype=DTYPE) for i in range(3))
    composed = anomaly_map(latents, template, difference="composed")
    first = (laplacian_compose(latents) - laplacian_compose(template)).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(composed, first)
    pyramid_map = anomaly_map(latents, template)
    assert composed.shape == pyramid_map.shape == (3, 1, 16, 16)
    assert (composed - pyramid_map).abs().max() > 1e-3, "the switch must change the map"
    with pytest.raises(ValueError, match="difference must be one of"):
        anomaly_map(latents, template, difference="first")


# -- loss="spatial": the same pairwise maps, no FFT ----------------------------------------------------


def test_spatial_loss_has_no_fft(monkeypatch):
    latents = tuple(torch.randn(3, 2, 16 // 2**i, 16 // 2**i, dtype=DTYPE) for i in range(3))
    expected = pairwise_difference_maps(latents).mean()
    fourier = fourier_loss(latents)
    calls = []
    real_fft2 = torch.fft.fft2
    monkeypatch.setattr(torch.fft, "fft2", lambda *a, **k: calls.append(1) or real_fft2(*a, **k))
    torch.testing.assert_close(spatial_loss(latents), expected)
    torch.testing.assert_close(objective_loss("spatial", latents), expected)
    assert calls == [], "the spatial loss must not call the FFT"
    torch.testing.assert_close(objective_loss("fourier", latents), fourier)
    assert calls == [1], "the Fourier loss goes through the FFT (the counter works)"
    assert not torch.allclose(expected, fourier)


# -- loss_p: the exponent of the pairwise difference -------------------------------------------------


@pytest.mark.parametrize("objective", ["fourier", "spatial"])
def test_loss_p_is_the_exponent_of_the_pairwise_difference(objective):
    latents = tuple(torch.randn(3, 2, 16 // 2**i, 16 // 2**i, dtype=DTYPE) for i in range(3))
    expected = {"fourier": fourier_loss, "spatial": spatial_loss}[objective](latents, 1.0)
    torch.testing.assert_close(objective_loss(objective, latents, p=1.0), expected)
    assert not torch.allclose(objective_loss(objective, latents), expected), "p=2 is another loss"


def test_the_training_step_uses_the_configs_loss_p(monkeypatch):
    import pyramidflow.train.step as step_module
    from pyramidflow.train.step import step_on_random_images

    seen = []
    real = step_module.objective_loss
    monkeypatch.setattr(step_module, "objective_loss", lambda *a, **k: seen.append(k.get("p")) or real(*a, **k))
    step_on_random_images(small(loss_p=1.0), 16)()
    step_on_random_images(small(), 16)()
    assert seen == [1.0, 2.0]


# -- through the command line, and `pyramidflow ablate` --------------------------------------------

SIZE = 32
SMALL = ["--channels", "4", "--kernel-size", "3", "--stacks", "1", "--levels", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=1, size=SIZE, num_train=8, num_test=1,
                              categories=("nut", "fabric"))


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "flags, field, value",
    [
        (["--volume-norm", "none"], "volume_norm", None),
        (["--template", "zero"], "template", "zero"),
        (["--template", "scaled"], "template", "scaled"),
        (["--difference", "composed"], "difference", "composed"),
        (["--loss", "spatial"], "loss", "spatial"),
        (["--loss-p", "1"], "loss_p", 1.0),
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
    others = {"volume_norm": "CVN", "template": "mean", "difference": "pyramid", "loss": "fourier", "loss_p": 2.0}
    del others[field]
    assert {k: ckpt.model_config[k] for k in others} == others, "one switch changes one setting"
    if value == "zero":
        assert all(not level.any() for level in ckpt.template)
    if value == "scaled":
        assert all(level.shape[0] == 2 and (level[1] > 0).all() for level in ckpt.template)
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
    with pytest.raises(ValueError, match="baseline must be the method, but it sets loss_p=1.0"):
        run_ablation(PyramidFlowConfig(loss_p=1.0), TrainConfig(steps=1), [], [], tmp_path / "b")
    assert main(args + ["--variants", "baseline"]) == 0
    capsys.readouterr()
    args[args.index("--steps") + 1] = "2"
    assert main(args + ["--variants", "baseline"]) != 0
    assert "other settings" in _error_line(capsys)
