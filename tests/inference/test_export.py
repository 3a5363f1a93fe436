"""ONNX and TorchScript export: same maps and scores as PyTorch, a dynamic batch, a file that runs in a
fresh process without pyramidflow, a straight-line eval graph, and one-line errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pyramidflow.inference.export as export_module
from pyramidflow.calibration import stored_mask_rule, stored_pixel_rule, stored_thresholds
from pyramidflow.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint_atomic
from pyramidflow.cli import main
from pyramidflow.data import MVTecDataset, synthetic
from pyramidflow.inference.maps import anomaly_maps, load_for_inference, predict_dataset
from pyramidflow.inference.export import ONNX_OPSET, export_checkpoint
from pyramidflow.model import PyramidFlowConfig, image_score
from pyramidflow.train import TrainConfig, train

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

SIZE = 32
ATOL = 1e-4  # the bound on |ONNX - PyTorch|
# Ops that would mean training-time behaviour or a data-dependent branch in the graph.
FORBIDDEN_OPS = {"If", "Loop", "Scan", "Dropout", "BatchNormalization", "RandomNormal", "RandomNormalLike",
                 "RandomUniform", "RandomUniformLike", "Multinomial"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=2, size=SIZE, categories=["nut"], num_train=6, num_test=1)


@pytest.fixture(scope="module")
def checkpoints(data_root, tmp_path_factory):
    """A finished tiny run per volume normalisation (a few steps: trained convs and running means)."""
    paths = {}
    for volume_norm in ("CVN", "SVN"):
        config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=3, volume_norm=volume_norm)
        out = tmp_path_factory.mktemp(f"run_{volume_norm}")
        data = MVTecDataset(data_root, "nut", split="train", size=SIZE)
        result = train(config, TrainConfig(steps=4, checkpoint_every=None, device="cpu"), data, out, progress=False)
        paths[volume_norm] = result.checkpoint_path
    return paths


@pytest.fixture(scope="module")
def onnx_files(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {vn: export_checkpoint(path, out / f"{vn}.onnx", batch_size=None, verify=False) for vn, path in checkpoints.items()}


@pytest.fixture(scope="module")
def test_images(data_root):
    data = MVTecDataset(data_root, "nut", split="test", size=SIZE)
    return torch.stack([data[i]["image"] for i in range(3)])


def _pytorch(checkpoint, images):
    """The maps and scores `pyramidflow eval` computes for ``images``, ``(N, 1, H, W)`` and ``(N,)``."""
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    maps = torch.from_numpy(anomaly_maps(inference.model, inference.template, images))[:, None]
    return maps.numpy(), image_score(maps).numpy()


def _assert_matches_pytorch(maps, scores, checkpoint, images) -> np.ndarray:
    """The exported graph's maps and scores equal PyTorch's on ``images``; returns PyTorch's maps."""
    expected_maps, expected_scores = _pytorch(checkpoint, images)
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=ATOL)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=ATOL)
    return expected_maps


def _run_in_fresh_process(script: str, tmp_path, images: torch.Tensor) -> dict:
    """Run ``script`` in a new interpreter, with ``images`` saved as ``images.npy`` in its working directory.

    The script must not import pyramidflow. Returns the arrays it saved.
    """
    np.save(tmp_path / "images.npy", images.numpy())
    code = textwrap.dedent(script) + textwrap.dedent(
        f"""
        import sys
        assert not any(name.split('.')[0] == 'pyramidflow' for name in sys.modules), 'pyramidflow was imported'
        np.savez({str(tmp_path / 'out.npz')!r}, maps=maps, scores=scores)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_onnx_matches_pytorch_for_every_batch_size(volume_norm, checkpoints, onnx_files, test_images):
    session = onnxruntime.InferenceSession(str(onnx_files[volume_norm]), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        images = test_images[:batch]
        maps, scores = session.run(["anomaly_map", "score"], {"images": images.numpy()})
        assert maps.shape == (batch, 1, SIZE, SIZE) and scores.shape == (batch,)
        expected_maps = _assert_matches_pytorch(maps, scores, checkpoints[volume_norm], images)
    assert np.ptp(expected_maps) > 10 * ATOL  # the maps are not flat: the comparison means something


@pytest.mark.slow
def test_onnx_graph_is_straight_line_eval_with_the_stated_opset(onnx_files, checkpoints):
    model = onnx.load(str(onnx_files["CVN"]))
    assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} == {("ai.onnx", ONNX_OPSET)}
    ops = {node.op_type for node in model.graph.node}
    assert not ops & FORBIDDEN_OPS, ops & FORBIDDEN_OPS
    assert [i.name for i in model.graph.input] == ["images"]  # the template and weights are constants
    batch, *rest = model.graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param and [d.dim_value for d in rest] == [3, SIZE, SIZE]
    metadata = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert metadata["pyramidflow.image_size"] == [SIZE, SIZE]
    image_threshold, pixel_threshold, _ = stored_thresholds(load_checkpoint(checkpoints["CVN"]))
    assert (metadata["pyramidflow.image_threshold"], metadata["pyramidflow.pixel_threshold"]) == (image_threshold, pixel_threshold)
    rule = stored_mask_rule(load_checkpoint(checkpoints["CVN"]))  # the whole mask rule predict applies
    assert (metadata["pyramidflow.pixel_mask_low"], metadata["pyramidflow.pixel_mask_peak_fraction"]) == (rule.low, rule.fraction)
    assert metadata["pyramidflow.pixel_rule"] == stored_pixel_rule(load_checkpoint(checkpoints["CVN"]))
    assert image_threshold > 0
    assert metadata["pyramidflow.normalize_mean"] == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_exported_onnx_runs_in_a_fresh_process_without_pyramidflow(checkpoints, onnx_files, test_images, tmp_path):
    out = _run_in_fresh_process(
        f"""
        import numpy as np, onnxruntime
        session = onnxruntime.InferenceSession({str(onnx_files['SVN'])!r}, providers=['CPUExecutionProvider'])
        maps, scores = session.run(None, {{'images': np.load('images.npy')}})
        """,
        tmp_path,
        test_images,
    )
    _assert_matches_pytorch(out["maps"], out["scores"], checkpoints["SVN"], test_images)


@pytest.mark.slow
def test_torchscript_from_the_cli_runs_in_a_fresh_process_at_any_batch(checkpoints, test_images, tmp_path, capsys):
    target = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(checkpoints["CVN"]), "--out", str(target), "--format", "torchscript"]) == 0
    assert f"torchscript graph written to {target}" in capsys.readouterr().out
    out = _run_in_fresh_process(
        f"""
        import numpy as np, torch
        graph = torch.jit.load({str(target)!r})
        with torch.no_grad():
            maps, scores = (t.numpy() for t in graph(torch.from_numpy(np.load('images.npy'))))
        """,
        tmp_path,
        test_images,
    )
    _assert_matches_pytorch(out["maps"], out["scores"], checkpoints["CVN"], test_images)


@pytest.mark.slow
def test_cli_onnx_with_a_fixed_batch(checkpoints, test_images, tmp_path, capsys):
    target = tmp_path / "sub" / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoints["SVN"]), "--out", str(target), "--batch-size", "2"]) == 0
    assert f"onnx graph written to {target} (opset {ONNX_OPSET}, batch 2)" in capsys.readouterr().out
    model = onnx.load(str(target))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, SIZE, SIZE]
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"images": test_images[:2].numpy()})
    np.testing.assert_allclose(scores, _pytorch(checkpoints["SVN"], test_images[:2])[1], rtol=0, atol=ATOL)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["model.onnx"]  # no temporary file left


def test_export_of_an_unfinished_run_is_one_error_line(checkpoints, tmp_path, capsys):
    state = torch.load(checkpoints["CVN"], weights_only=True)
    state.update(finished=False, template=None, score_stats=None)  # what a run stopped mid-way leaves
    unfinished = save_checkpoint_atomic(state, tmp_path / CHECKPOINT_NAME)
    target = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(unfinished), "--out", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(unfinished) in err[0] and "--resume" in err[0], err
    assert not target.exists()


@pytest.mark.slow
def test_a_graph_that_disagrees_with_pytorch_is_not_written(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "VERIFY_ATOL", -1.0)  # any difference, even 0, now counts as too large
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_checkpoint(checkpoints["CVN"], tmp_path / "model.pt", format="torchscript")
    assert list(tmp_path.iterdir()) == []


# The switches that change the map of a trained checkpoint (``loss`` changes training only).
MAP_SWITCHES = [("difference", "composed"), ("template", "scaled"), ("template", "zero"), ("volume_norm", None)]


@pytest.mark.slow
@pytest.mark.parametrize("switch, value", MAP_SWITCHES)
def test_export_of_an_ablation_checkpoint_gives_evals_maps(switch, value, data_root, tmp_path):
    """The exported graph's maps are `eval`'s, whatever map the checkpoint's switch asks for."""
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=3, **{switch: value})
    train_set = MVTecDataset(data_root, "nut", split="train", size=SIZE)
    checkpoint = train(config, TrainConfig(steps=4, checkpoint_every=None, device="cpu"), train_set, tmp_path / "run",
                       progress=False).checkpoint_path
    target = export_checkpoint(checkpoint, tmp_path / "model.onnx", batch_size=None)
    test_set = MVTecDataset(data_root, "nut", split="test", size=SIZE)
    inference = load_for_inference(checkpoint, torch.device("cpu"))
    evals = predict_dataset(inference.model, inference.template, test_set, device=inference.device, progress=False)
    images = torch.stack([test_set[i]["image"] for i in range(len(test_set))])
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["anomaly_map", "score"], {"images": images.numpy()})
    np.testing.assert_allclose(maps[:, 0], evals.maps, rtol=0, atol=ATOL)
    np.testing.assert_allclose(scores, evals.scores, rtol=0, atol=ATOL)
    assert np.ptp(evals.maps) > 10 * ATOL  # the maps are not flat: the comparison means something


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_bad_batch_size_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", "c.pt", "--out", "m.onnx", "--batch-size", value])
    assert exit_info.value.code == 2 and "expected a positive integer or 'dynamic'" in capsys.readouterr().err


def test_torchscript_outputs_do_not_require_grad(checkpoints, test_images, tmp_path):
    """A plain call of the file must not build a graph; the module it was traced from keeps its parameters."""
    inference = load_for_inference(checkpoints["CVN"], torch.device("cpu"))
    graph = export_module.InferenceGraph(inference.model, inference.template)
    flags = [p.requires_grad for p in graph.parameters()]
    assert any(flags)
    target = export_module.export_graph(graph, tmp_path / "model.pt", image_size=(SIZE, SIZE), format="torchscript")
    maps, scores = torch.jit.load(str(target))(test_images)
    assert not maps.requires_grad and not scores.requires_grad
    assert [p.requires_grad for p in graph.parameters()] == flags
