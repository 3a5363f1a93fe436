"""The tiled coupling (``backward_tile``) against the whole-level one: same latents, same gradients."""

import pytest
import torch

from pyramidflow.engine import CallContext, InvertibleSequential
from pyramidflow.memory.plan import predict_peak
from pyramidflow.model import PyramidFlow, PyramidFlowConfig
from pyramidflow.model.coupling import ThreeLevelCoupling, TwoLevelCoupling
from pyramidflow.model.loss import fourier_loss
from pyramidflow.train.config import TrainConfig

from model._perturb import perturbed


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _pyramid(batch, side, levels, channels=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, side >> i, side >> i, generator=generator, dtype=torch.float64) for i in range(levels)]


def _block_results(make, tile, xs, drift="off"):
    torch.manual_seed(0)
    block = perturbed(make(tile).double())
    flow = InvertibleSequential(block, mode="invertible", drift=drift)
    leaves = [x.clone().requires_grad_(True) for x in xs]
    ys, _ = flow(leaves)
    upstream = _pyramid(xs[0].shape[0], xs[0].shape[-1], len(xs), xs[0].shape[1], seed=7)
    torch.autograd.backward(list(ys), upstream)
    grads = [leaf.grad for leaf in leaves] + [p.grad for p in block.parameters() if p.requires_grad]
    return [y.detach() for y in ys], grads


BLOCKS = {
    "up": lambda tile: TwoLevelCoupling(0, "up", 3, kernel_size=3, tile=tile),
    "down": lambda tile: TwoLevelCoupling(0, "down", 3, kernel_size=3, tile=tile),
    "down_coarse": lambda tile: TwoLevelCoupling(1, "down", 3, kernel_size=5, tile=tile),
    "three": lambda tile: ThreeLevelCoupling(0, 3, kernel_size=3, tile=tile),
    "three_coarse": lambda tile: ThreeLevelCoupling(1, 3, kernel_size=5, tile=tile),
}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
@pytest.mark.parametrize("batch, side, tile", [(2, 32, 8), (3, 40, 16), (2, 24, 64)])
def test_tiled_block_matches_the_whole_level_one(kind, batch, side, tile):
    """Each block kind, a side that is not a multiple of the tile (40 px, 16 px tiles), a tile larger than the
    image (24 px, 64 px tiles: one tile, every border true), batch sizes 2 and 3; float64."""
    xs = _pyramid(batch, side, 4)
    plain_ys, plain_grads = _block_results(BLOCKS[kind], None, xs)
    tiled_ys, tiled_grads = _block_results(BLOCKS[kind], tile, xs)
    for plain, tiled in zip(plain_ys + plain_grads, tiled_ys + tiled_grads):
        assert _relative(tiled, plain) <= 1e-12


@pytest.mark.parametrize("kind", ["down", "three"])
def test_tiled_block_border_pixels_take_the_models_zero_padding(kind):
    """A tile whose halo reaches past the image must use the convs' zero padding there: the gradient of the
    border rows and columns (where an implementation padding with neighbouring data would differ) matches."""
    xs = _pyramid(2, 32, 4)
    _, plain_grads = _block_results(BLOCKS[kind], None, xs)
    _, tiled_grads = _block_results(BLOCKS[kind], 8, xs)
    for plain, tiled in zip(plain_grads[:3], tiled_grads[:3]):
        for border in (plain[..., 0, :], plain[..., -1, :], plain[..., :, 0], plain[..., :, -1]):
            assert border.abs().max() > 0
        assert _relative(tiled[..., 0, :], plain[..., 0, :]) <= 1e-12
        assert _relative(tiled[..., :, -1], plain[..., :, -1]) <= 1e-12


def _model_results(tile, *, batch=2, side=64, drift="off", tolerance=None, anchor_every=None, train=True):
    torch.manual_seed(0)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=4, backward_tile=tile)
    model = perturbed(PyramidFlow(config).double()).train(train)
    model.flow.drift, model.flow.drift_tolerance, model.flow.anchor_every = drift, tolerance, anchor_every
    images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    latents = model(images, release_outputs=True)
    kept = [z.detach().clone() for z in latents]  # backward reuses the given-up latents' storage
    fourier_loss(latents).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return kept, grads, model


@pytest.mark.parametrize("batch, side", [(2, 64), (3, 72)])
def test_tiled_model_matches_untiled_gradients(batch, side):
    plain_z, plain_grads, _ = _model_results(None, batch=batch, side=side)
    tiled_z, tiled_grads, _ = _model_results(16, batch=batch, side=side)
    for plain, tiled in zip(plain_z + plain_grads, tiled_z + tiled_grads):
        assert _relative(tiled, plain) <= 1e-12


def test_tiled_drift_recompute_and_anchors_give_the_same_gradients():
    """drift="recompute" with a zero tolerance redoes every block from an exact input (the tiled rebuild of an
    anchor, or the input computed again from the images), and anchors every 3 blocks take that path too."""
    plain_z, plain_grads, _ = _model_results(None)
    tiled_z, tiled_grads, model = _model_results(16, drift="recompute", tolerance=0.0, anchor_every=3)
    assert len(model.flow.last_recomputed) > 0
    for plain, tiled in zip(plain_z + plain_grads, tiled_z + tiled_grads):
        assert _relative(tiled, plain) <= 1e-12


def test_tiled_drift_recompute_without_a_redo_gives_the_same_gradients():
    """The training loop's setting: each block rebuilds its input before its local backward, tiled, or with the
    plain ops where every level it touches is half a tile or less (the "down" block on levels 2 and 3 at 64 px,
    tiles of 32: NOTE [plain where the level is small]); no block drifts, and the gradients are the untiled ones."""
    plain_z, plain_grads, _ = _model_results(None)
    tiled_z, tiled_grads, model = _model_results(32, drift="recompute")
    assert model.flow.last_recomputed == ()
    ones = [block for block in model.flow.blocks if block._plain([torch.empty(1, 1, 64 >> i, 64 >> i) for i in range(4)])]
    assert 0 < len(ones) < len(model.flow.blocks)
    for plain, tiled in zip(plain_z + plain_grads, tiled_z + tiled_grads):
        assert _relative(tiled, plain) <= 1e-12


def test_tiled_eval_forward_uses_the_running_mean_per_tile():
    _, _, trained = _model_results(16)  # one training step: the CVN running means exist
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        tiled = trained.eval()(images)
        for block in trained.flow.blocks:
            block.tile = None
        plain = trained(images)
    for a, b in zip(tiled, plain):
        assert _relative(a, b) <= 1e-12


def test_images_changed_before_a_drift_recompute_raise():
    torch.manual_seed(0)
    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=2, backward_tile=8)
    model = perturbed(PyramidFlow(config).double()).train()
    model.flow.drift, model.flow.drift_tolerance = "recompute", 0.0
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    loss = fourier_loss(model(images, release_outputs=True))
    images.add_(1.0)
    with pytest.raises(ValueError, match="images were modified in place"):
        loss.backward()


@pytest.mark.parametrize("volume_norm", ["SVN", None])
def test_backward_tile_refuses_what_a_tile_cannot_do_alone(volume_norm):
    with pytest.raises(ValueError, match="backward_tile needs volume_norm='CVN'"):
        PyramidFlowConfig(volume_norm=volume_norm, backward_tile=64)
    with pytest.raises(ValueError, match="backward_tile needs volume_norm='CVN'"):
        TwoLevelCoupling(0, "up", 3, volume_norm=volume_norm, tile=64)


def test_backward_tile_must_align_with_the_coarsest_level():
    with pytest.raises(ValueError, match=r"multiple of 2\*\*\(num_levels - 1\) = 8 pixels.*use 104"):
        PyramidFlowConfig(num_levels=4, backward_tile=100)
    with pytest.raises(TypeError, match="must be an int"):
        PyramidFlowConfig(backward_tile=64.0)


def test_tiled_backward_refuses_synchronised_volume_norm():
    model = PyramidFlow(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=2, backward_tile=8))
    with pytest.raises(ValueError, match="synchronised across ranks"):
        model.synchronize_volume_norm(object())


def test_tiled_working_set_is_a_fraction_of_the_whole_level_one():
    """The planner's count (meta device, the real step): the peak beyond the model, the batch, and the
    pyramid with its gradients. Untiled it grows with the area; tiled (32 px) it is under a third of that
    at 256 px."""
    train = TrainConfig(steps=1, drift="recompute")

    def working(tile, side):
        config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3, backward_tile=tile)
        plan = predict_peak(config, side, 2, train_config=train)
        state = 2 * sum(2 * config.channels * (side >> i) ** 2 * 4 for i in range(config.num_levels))
        return plan.peak - plan.parameters_and_optimizer - plan.input_batch - state

    assert working(None, 256) > 3 * working(None, 128)
    assert working(32, 256) <= working(None, 256) / 3


def test_tiled_training_forward_writes_over_the_pyramid_in_one_tiles_memory(monkeypatch):
    """NOTE [forward in place]: the flow's training forward needs, beyond the pyramid it is given (and
    gives up), one tile's working set: the same at 256 and 512 px (every level has inner tiles, with
    whole halos, at both: NOTE [tile side]). Writing each level anew instead holds a level more at a
    time, which grows with the area."""
    from pyramidflow.memory.plan import _LiveBytes

    def beyond_the_pyramid(side):
        config = PyramidFlowConfig(channels=16, kernel_size=3, num_stacks=1, num_levels=3, backward_tile=32)
        counter = _LiveBytes()
        with torch.device("meta"), counter:
            model = PyramidFlow(config).train()
            levels = model.pyramid.decompose(torch.empty(2, 16, side, side))
            model.flow(levels)  # the running means exist, as after a first step
            counter.peak = before = counter.live
            model.flow(levels, release_outputs=True, consume_input=True)
        return counter.peak - before

    in_place = beyond_the_pyramid(256), beyond_the_pyramid(512)
    assert in_place[1] == in_place[0]
    monkeypatch.setattr(CallContext, "may_overwrite", lambda context, level: False)
    anew = beyond_the_pyramid(256), beyond_the_pyramid(512)
    assert anew[1] > 3 * anew[0] and anew[0] > 3 * in_place[0]


def test_tiled_forward_folds_the_running_mean_tile_by_tile():
    """The running means a tiled training forward leaves equal the whole-level forward's (float64 rounding:
    F runs on windows): every pixel is folded once per step."""
    xs = _pyramid(2, 40, 3, seed=3)
    means = []
    for tile in (None, 8):
        torch.manual_seed(0)
        model = PyramidFlow(PyramidFlowConfig(channels=3, kernel_size=3, num_stacks=1, num_levels=3, backward_tile=tile))
        perturbed(model.double()).train()
        with torch.no_grad():
            model.flow([x.clone() for x in xs])
        means.append([block.volume_norm.running_mean.clone() for block in model.flow.blocks])
    for tiled, whole in zip(*means):
        assert tiled.shape == whole.shape and tiled.abs().max() > 0
        torch.testing.assert_close(tiled, whole, rtol=1e-12, atol=1e-14)


def test_planning_runs_only_representative_tiles_and_gets_the_same_peak(monkeypatch):
    """NOTE [tiles on meta]: the planner's shortcut (a few tiles of each position) predicts what all tiles do."""
    from pyramidflow.model import tiles

    config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3, backward_tile=16)
    shortcut = predict_peak(config, 128, 2)
    monkeypatch.setattr(tiles, "_representatives", lambda starts: starts)
    every_tile = predict_peak(config, 128, 2)
    assert shortcut == every_tile
