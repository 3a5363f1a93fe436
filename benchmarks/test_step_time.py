"""One full PyramidFlow training step (forward, loss, backward, Adam step) per engine mode.

On CUDA the paper's configuration is used (C = 16, k = 7, 4 stacks, L = 4,
batch 2) and the invertible mode runs twice: with the PyTorch reference of the
coupling op and with the Triton kernels. On CPU the same architecture runs
narrower by default (C = 4, so the hidden width is 8) to finish on 2 cores in
minutes; the table says so in its note column, and ``--bench-channels 16``
runs the paper's width. Sweeps time one round only: their point is memory.
Groups:

* ``step``: the three modes (four on CUDA) at ``--bench-resolution`` (1024), invertible with the
  default drift monitoring (``"warn"``), and invertible with ``drift="off"`` and ``"recompute"``.
* ``depth``: peak memory against the number of stacks (1, 2, 4, 8, 16) at 256 px, in the three modes.
* ``depth, paper width``: the same sweep at the paper's C = 16 on every device, with memcnn's wrapper as the peer.
* ``resolution``: peak memory and time against the image side (256, 512, 1024; 2048 on CUDA) at 4 stacks,
  autograd, invertible, and invertible with ``backward_tile=128`` (``"invertible, tile 128"``; up to 4096 on CUDA).
* ``step`` also holds the peer row: memcnn's ``InvertibleModuleWrapper`` around each block, when memcnn is installed.
* ``encoder``: the ResNet18 variant (features at 1/4 of the input side, C = 64) at
  ``--bench-encoder-resolution`` input: ``--bench-resolution`` on CUDA; on CPU half of it, k = 3 and one round.

On CPU, so that the whole harness stays within minutes, the drift-policy rows time one round and the
resolution sweep leaves out ``--bench-resolution`` itself: that point is the ``step`` group's
autograd and invertible rows (same model, batch and drift setting).
"""

from __future__ import annotations

import pytest
import torch

from pyramidflow.model import PyramidFlow, PyramidFlowConfig, fourier_loss


def _config(channels: int, mode: str, num_stacks: int = 4, backward_tile=None) -> tuple[PyramidFlowConfig, str]:
    note = "paper config" if channels == 16 else f"C={channels} (paper: 16)"
    return PyramidFlowConfig(mode=mode, num_stacks=num_stacks, channels=channels, backward_tile=backward_tile), note


def _training_step(model: torch.nn.Module, images: torch.Tensor):
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.9), eps=1e-4, weight_decay=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = fourier_loss(model(images, release_outputs=True))  # as the training loop: the latents die after the loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def _setup(device, channels, mode, resolution, num_stacks=4, drift="warn", backward_tile=None):
    torch.manual_seed(0)
    config, note = _config(channels, mode, num_stacks, backward_tile)
    model = PyramidFlow(config).to(device).train()
    model.flow.drift = drift
    images = torch.randn(2, 3, resolution, resolution, device=device)
    return _training_step(model, images), note


@pytest.fixture
def kernel_backend(monkeypatch):
    """Force the coupling op's backend for one benchmark (the env var is read at every call)."""

    def use(backend: str) -> None:
        monkeypatch.setenv("PYRAMIDFLOW_KERNELS", backend)

    return use


@pytest.mark.benchmark(group="step")
@pytest.mark.parametrize("mode,backend", [("autograd", "reference"), ("checkpoint", "reference"), ("invertible", "reference"), ("invertible", "triton")])
def test_step(benchmark, measure_step, device, channels, resolution, kernel_backend, mode, backend):
    if backend == "triton" and device.type != "cuda":
        pytest.skip("the Triton kernels run on CUDA only (CPU tests run them under the interpreter)")
    kernel_backend(backend)
    step, note = _setup(device, channels, mode, resolution)
    name = mode if backend == "reference" else "invertible+triton"
    measure_step(step, row=dict(mode=name, resolution=resolution, depth=4, note=note))


@pytest.mark.benchmark(group="step")
@pytest.mark.parametrize("drift", ["off", "recompute"])
def test_step_drift_policy(benchmark, measure_step, device, channels, resolution, kernel_backend, drift):
    """Invertible mode under the other drift policies (the ``test_step`` row runs the default, ``"warn"``)."""
    kernel_backend("reference")
    step, note = _setup(device, channels, "invertible", resolution, drift=drift)
    measure_step(step, row=dict(mode=f"invertible, {drift}", resolution=resolution, depth=4, note=note),
                 timed_rounds=None if device.type == "cuda" else 1)


@pytest.mark.benchmark(group="depth")
@pytest.mark.parametrize("num_stacks", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("mode", ["autograd", "checkpoint", "invertible"])
def test_memory_against_depth(benchmark, measure_step, device, channels, mode, num_stacks, kernel_backend):
    kernel_backend("reference")
    step, note = _setup(device, channels, mode, 256, num_stacks)
    measure_step(step, row=dict(mode=mode, resolution=256, depth=num_stacks, note=note), timed_rounds=1)


@pytest.mark.benchmark(group="depth, paper width")
@pytest.mark.parametrize("num_stacks", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("mode", ["autograd", "checkpoint", "invertible", "memcnn wrapper"])
def test_memory_against_depth_paper_width(benchmark, measure_step, device, mode, num_stacks, kernel_backend):
    """The depth sweep at the paper's width (C = 16) on every device: invertible must be the lowest at each depth."""
    kernel_backend("reference")
    if mode == "memcnn wrapper":
        step, note = _memcnn_step(device, 16, 256, num_stacks)
    else:
        step, note = _setup(device, 16, mode, 256, num_stacks)
    measure_step(step, row=dict(mode=mode, resolution=256, depth=num_stacks, note=note), timed_rounds=1)


TILE = 128  # the resolution sweep's tiled row (pixels of level 0)


def _resolutions(device, tiled=False):
    return [256, 512, 1024] + ([2048] + ([4096] if tiled else []) if device.type == "cuda" else [])


@pytest.mark.benchmark(group="resolution")
@pytest.mark.parametrize("side", [256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("mode", ["autograd", "invertible", f"invertible, tile {TILE}"])
def test_memory_against_resolution(benchmark, measure_step, device, channels, resolution, mode, side, kernel_backend):
    tiled = mode.endswith(f"tile {TILE}")
    if side not in _resolutions(device, tiled):
        pytest.skip("2048 px (4096 px tiled) is measured on CUDA only (CPU time budget)")
    if device.type == "cpu" and side == resolution and not tiled:
        pytest.skip("on CPU this point is the step group's row at --bench-resolution (the same run)")
    kernel_backend("reference")
    step, note = _setup(device, channels, mode.split(",")[0], side, backward_tile=TILE if tiled else None)
    measure_step(step, row=dict(mode=mode, resolution=side, depth=4, note=note), timed_rounds=1)


@pytest.mark.benchmark(group="step")
def test_memcnn_peer(benchmark, measure_step, device, channels, resolution):
    step, note = _memcnn_step(device, channels, resolution)
    measure_step(step, row=dict(mode="memcnn wrapper", resolution=resolution, depth=4, note=note))


def _memcnn_step(device, channels, resolution, num_stacks=4):
    """A training step of PyramidFlow whose blocks each run under memcnn's wrapper (skips without memcnn)."""
    memcnn = pytest.importorskip("memcnn", reason="memcnn is not installed (it is an optional peer, not a dependency)")
    torch.manual_seed(0)
    config, note = _config(channels, "autograd", num_stacks)
    model = PyramidFlow(config).to(device).train()
    model.flow.blocks = torch.nn.ModuleList(
        _MemcnnBlock(memcnn, block) for block in model.flow.blocks
    )
    images = torch.randn(2, 3, resolution, resolution, device=device)
    return _training_step(model, images), note


class _MemcnnBlock(torch.nn.Module):
    """A pyramid block under memcnn's InvertibleModuleWrapper (which takes and returns tensors)."""

    def __init__(self, memcnn, block):
        super().__init__()

        class _Flat(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            # memcnn frees the storage of its inputs after forward (keep_input=False), so a level our
            # blocks pass through untouched must come out as a new tensor, not the input object.
            def forward(self, *xs):
                return _fresh(self.inner(tuple(xs))[0], xs)

            def inverse(self, *ys):
                return _fresh(self.inner.inverse(tuple(ys))[0], ys)

        self.wrapped = memcnn.InvertibleModuleWrapper(_Flat(block), keep_input=False, keep_input_inverse=False)

    def forward(self, xs):
        return tuple(self.wrapped(*xs)), None

    def inverse(self, ys):
        return tuple(self.wrapped.inverse(*ys)), None


def _fresh(outputs, inputs):
    return tuple(y.clone() if any(y is x for x in inputs) else y for y in outputs)


@pytest.mark.benchmark(group="encoder")
@pytest.mark.parametrize("mode", ["autograd", "invertible"])
def test_encoder_step(benchmark, measure_step, device, encoder_resolution, mode, kernel_backend, tmp_path):
    """The ResNet18 variant: images at ``--bench-encoder-resolution`` -> a frozen stem -> features at 1/4, C = 64.

    Random stem weights from a local file (what an offline machine uses). On CPU the couplings use k = 3 instead
    of the paper's 7 and one timed round, so the two rows fit the harness's budget; the row's note says so.
    """
    from pyramidflow.model.encoder import ResNet18Stem

    kernel_backend("reference")
    torch.manual_seed(0)
    torch.save(ResNet18Stem().state_dict(), tmp_path / "resnet18.pt")
    kernel_size = 7 if device.type == "cuda" else 3
    config = PyramidFlowConfig(mode=mode, encoder="resnet18", encoder_weights=str(tmp_path / "resnet18.pt"),
                               kernel_size=kernel_size)
    model = PyramidFlow(config).to(device).train()
    images = torch.randn(2, 3, encoder_resolution, encoder_resolution, device=device)
    side = encoder_resolution // config.input_stride
    note = f"resnet18 stem -> {side}²×64, k={kernel_size}" + ("" if kernel_size == 7 else " (paper: 7)")
    measure_step(_training_step(model, images), row=dict(mode=mode, resolution=encoder_resolution, depth=4, note=note),
                 timed_rounds=None if device.type == "cuda" else 1)
