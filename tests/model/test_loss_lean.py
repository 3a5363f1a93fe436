"""The lean pairwise difference maps (model/lean_loss.py) against the same expression under plain autograd."""

import pytest
import torch

from pyramidflow.memory.plan import _LiveBytes
from pyramidflow.model.lean_loss import pairwise_level_differences
from pyramidflow.model.loss import fourier_loss, pairwise_difference_maps, spatial_loss
from pyramidflow.model.pyramid import laplacian_compose


def _autograd_level_maps(latents, p):
    """The oracle: ``mean_C |z[a] - z[b]|**p`` per level for every pair, written for autograd."""
    batch = latents[0].shape[0]
    first, second = torch.triu_indices(batch, batch, offset=1, device=latents[0].device)
    return [(z[first] - z[second]).abs().pow(p).mean(dim=1, keepdim=True) for z in latents]


def _latents(batch, channels, height, width, levels, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, height >> i, width >> i, generator=generator, dtype=dtype).requires_grad_()
        for i in range(levels)
    ]


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("p", [2.0, 1.5])
@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("levels", [1, 3, 4])
def test_lean_maps_and_gradients_match_autograd(p, batch, levels):
    latents = _latents(batch, 5, 24, 40, levels)
    lean = pairwise_level_differences(latents, p)
    oracle = _autograd_level_maps(latents, p)
    weights = [torch.randn_like(m) for m in oracle]
    for got, want in zip(lean, oracle):
        assert got.shape == want.shape == (batch * (batch - 1) // 2, 1, *want.shape[2:])
        assert _relative(got, want) <= 1e-12
    got_grads = torch.autograd.grad(sum((m * w).sum() for m, w in zip(lean, weights)), latents)
    want_grads = torch.autograd.grad(sum((m * w).sum() for m, w in zip(oracle, weights)), latents)
    for got, want in zip(got_grads, want_grads):
        assert _relative(got, want) <= 1e-12


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("p", [2.0, 1.5])
def test_fourier_and_spatial_loss_gradients_match_autograd(batch, p):
    latents = _latents(batch, 4, 32, 48, 4, seed=1)
    oracle_maps = laplacian_compose(_autograd_level_maps(latents, p))[:, 0]
    for loss, oracle in (
        (fourier_loss(latents, p), torch.fft.fft2(oracle_maps).abs().mean()),
        (spatial_loss(latents, p), oracle_maps.mean()),
    ):
        assert abs(loss.item() - oracle.item()) <= 1e-12 * abs(oracle.item())
        got = torch.autograd.grad(loss, latents)
        want = torch.autograd.grad(oracle, latents, retain_graph=True)
        for g, w in zip(got, want):
            assert _relative(g, w) <= 1e-12


def test_a_level_without_grad_gets_none_and_the_others_are_right():
    latents = _latents(3, 3, 16, 16, 2, seed=2)
    frozen = latents[1].detach()
    maps = pairwise_level_differences([latents[0], frozen], 2.0)
    grad, = torch.autograd.grad(sum(m.sum() for m in maps), [latents[0]])
    want, = torch.autograd.grad(sum(m.sum() for m in _autograd_level_maps([latents[0], frozen], 2.0)), [latents[0]])
    assert _relative(grad, want) <= 1e-12


def test_only_the_latents_are_saved_for_backward():
    """The Function keeps references to the latents and nothing else; autograd keeps copies of them."""
    latents = _latents(3, 4, 32, 32, 3, dtype=torch.float32)
    latent_storages = {z.untyped_storage().data_ptr() for z in latents}

    def saved(build):
        packed = []

        def pack(t):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            build()
        extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed}
        return sum(n for ptr, n in extra.items() if ptr not in latent_storages), len(packed)

    lean_extra, lean_count = saved(lambda: pairwise_level_differences(latents, 2.0))
    autograd_extra, _ = saved(lambda: _autograd_level_maps(latents, 2.0))
    latent_bytes = sum(z.numel() * z.element_size() for z in latents)
    assert lean_count == len(latents) and lean_extra == 0
    assert autograd_extra >= latent_bytes  # the oracle does keep copies: the comparison can fail


def _loss_step_peak(maps, batch, channels, side, levels=4):
    """Peak bytes, counted on the meta device, of the loss's forward and backward on fresh latents."""
    counter = _LiveBytes()
    with torch.device("meta"), counter:
        latents = [torch.empty(batch, channels, side >> i, side >> i, requires_grad=True) for i in range(levels)]
        start = counter.live
        loss = torch.fft.fft2(maps(latents)).abs().mean()
        loss.backward()
        del loss
    return counter.peak - start, start


@pytest.mark.parametrize("batch", [2, 3])
def test_the_loss_step_peak_fell(batch):
    """Lean: the latents' gradients and slices above the latents; autograd's graph is about two pyramids more."""
    lean, latent_bytes = _loss_step_peak(pairwise_difference_maps, batch, 8, 256)
    oracle, _ = _loss_step_peak(lambda z: laplacian_compose(_autograd_level_maps(z, 2.0))[:, 0], batch, 8, 256)
    pairs = batch * (batch - 1) // 2
    # The floor: the gradients (one pyramid) plus a few one-channel maps per pair (the maps, their
    # gradients, the FFT's complex values); a map per pair is pairs / (C·B) of the latents.
    # Measured (batch 2, 3): 1.07 and 1.25 of the latents, 0.37 and 0.26 of autograd's peak.
    assert lean <= latent_bytes * (1 + 3 * pairs / (8 * batch)), (lean, latent_bytes)
    assert lean <= 0.45 * oracle, (lean, oracle)


def test_runs_on_meta_with_the_pair_order_of_triu_indices():
    with torch.device("meta"):
        latents = [torch.empty(3, 2, 8, 8, requires_grad=True), torch.empty(3, 2, 4, 4, requires_grad=True)]
        fourier_loss(latents).backward()
        assert latents[0].grad.shape == (3, 2, 8, 8)
    z = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    z[1] = 1.0
    z[2] = 3.0
    maps = pairwise_level_differences([z], 2.0)[0][:, 0, 0, 0]
    assert maps.tolist() == [1.0, 9.0, 4.0]  # pairs (0, 1), (0, 2), (1, 2)


def test_a_latent_changed_in_place_after_the_loss_raises_in_backward():
    from pyramidflow.engine import InvertibleError

    latents = _latents(2, 2, 8, 8, 2, seed=3)
    work = [z * 1.0 for z in latents]
    loss = fourier_loss(work)
    with torch.no_grad():
        work[1].add_(1.0)
    with pytest.raises(InvertibleError, match="modified in place"):
        loss.backward()
