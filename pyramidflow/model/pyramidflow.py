"""PyramidFlow: lift, Laplacian pyramid, and stacks of pyramid couplings in one InvertibleSequential.

``images (N, 3, H, W) -> lift -> features (N, C, H, W) -> Laplacian pyramid
(L levels) -> flow -> latent pyramid (L tensors, finest first)``. The lift may be
replaced by a frozen pretrained encoder (the paper's ResNet18 variant, :mod:`.encoder`). Every block
preserves volume, so the model has no log-determinant (except in the
``volume_norm=None`` ablation, see ``forward(..., return_logdet=True)``); training pulls the
latents of normal images together (:mod:`.loss`) and inference compares a
latent with the mean latent of the training images (:mod:`.anomaly_map`).
ImageNet normalisation of the images is the data pipeline's job.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.sequential import MODES, InvertibleSequential
from ..kernels import BACKENDS
from .anomaly_map import DIFFERENCES, TEMPLATES, anomaly_map
from .conv1x1 import CONV1X1_INITS
from .coupling import PyramidCoupling, ThreeLevelCoupling, TwoLevelCoupling
from .encoder import ENCODER_CHANNELS, ENCODER_STRIDES, ENCODERS, build_encoder
from .loss import LOSSES
from .tiles import check_tile_alignment, check_tile_support, check_tile_unsynchronised
from .pyramid import DOWNSAMPLES, LaplacianPyramid, check_image_size, nearest_valid_side
from .volume_norm import VOLUME_NORM_CHOICES

__all__ = ["PyramidFlowConfig", "PyramidFlow", "InputLift", "stack_layout"]

# The authors' per-category settings (MVTec AD); any other name gets the defaults.
_SVN_CATEGORIES = frozenset({"carpet", "grid", "bottle", "transistor"})
_LEVELS_BY_CATEGORY = {"metal_nut": 8, "carpet": 8, "transistor": 8, "screw": 2}
# The texture recipe's model settings for a texture of one's own (`train --texture`), measured on the
# development set of real textures (benchmarks/README.md, "Recipes for natural textures").
_TEXTURE_SETTINGS = {"num_levels": 2}


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PyramidFlowConfig: {name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"PyramidFlowConfig: {name} must be at least {minimum}, got {value}.")


@dataclass
class PyramidFlowConfig:
    """Settings of a :class:`PyramidFlow`; the defaults are the method's.

    Args:
        channels: C, channels of the lifted features and of every level; ``None`` (the default)
            for 16, or the encoder's width (64 for ``"resnet18"``).
        kernel_size: odd kernel size k of the couplings' networks (7).
        num_stacks: number of stacks; each stack transforms every level once (4).
        num_levels: L, levels of the Laplacian pyramid, at least 2 (4).
        volume_norm: ``"CVN"`` (per-pixel, resolution-bound), ``"SVN"`` (per-channel), or ``None``
            (ablation: no volume normalisation; the flow has a log-det and trains with the Gaussian
            negative log-likelihood instead of ``loss``, see :attr:`objective`).
        mode: the engine's mode, ``"invertible"``, ``"checkpoint"`` or ``"autograd"``.
        hidden_channels: hidden width of the networks; ``None`` for 2C.
        clamp: soft-clamp bound of the log-scales (2.0).
        momentum: running-mean momentum of the volume normalisation (0.1).
        downsample: ``"max"`` (2×2 max-pooling, the authors' code) or ``"nearest"`` (the paper's text).
        conv1x1_init: ``"orthogonal"``, ``"rotation"`` or ``"identity"`` for the 1×1 convs.
        in_channels: channels of the images (3).
        kernels: backend of the coupling op: ``"auto"`` (Triton on CUDA when
            available, else the PyTorch reference), ``"reference"`` or ``"triton"``.
        encoder: ``"none"`` (the frozen 1×1 lift, training from scratch) or ``"resnet18"``
            (the paper's ResNet18 variant: a frozen ImageNet stem, features at 1/4 of the
            image side, C = 64; see :mod:`.encoder`).
        encoder_weights: with an encoder, ``"imagenet"`` (torchvision's weights, downloaded)
            or the path of a local ResNet18 state dict; ``None`` without one.
        template: ``"mean"`` (the mean training latent, the method) or ``"zero"`` (ablation:
            the map is the latent's own magnitude).
        difference: ``"pyramid"`` (subtract the template per level, then compose, the method) or
            ``"composed"`` (ablation: compose latent and template first, then subtract).
        loss: ``"fourier"`` (the method) or ``"spatial"`` (ablation: the pairwise difference map's
            plain mean, no FFT). Used with volume normalisation only.
        loss_p: exponent p of the loss's per-level difference ``|z_a - z_b|**p``, at least 1 (2, the
            method's; 1 weighs large differences less). Used with volume normalisation only.
        backward_tile: ``None`` (the default) rebuilds and backpropagates each coupling over whole
            levels; an int T runs each coupling's no-grad forward, rebuild and backward in tiles of
            T×T pixels at the level its network runs at (a multiple of ``2**(num_levels - 1)``), so their working set is one
            tile's whatever the image size (:mod:`.tiled`). Results equal the untiled ones to
            rounding. Needs ``volume_norm="CVN"`` (SVN's mean and the log-det without VN span the
            whole level).

    ``volume_norm=None``, ``template``, ``difference`` and ``loss`` are the paper's ablations
    (Table 2); each changes one thing, and the defaults are the method's.

    Example:
        >>> PyramidFlowConfig.for_category("screw").num_levels
        2
    """

    channels: Optional[int] = None
    kernel_size: int = 7
    num_stacks: int = 4
    num_levels: int = 4
    volume_norm: Optional[str] = "CVN"
    mode: str = "invertible"
    hidden_channels: Optional[int] = None
    clamp: float = 2.0
    momentum: float = 0.1
    downsample: str = "max"
    conv1x1_init: str = "orthogonal"
    in_channels: int = 3
    kernels: str = "auto"
    encoder: str = "none"
    encoder_weights: Optional[str] = None
    template: str = "mean"
    difference: str = "pyramid"
    loss: str = "fourier"
    loss_p: float = 2.0
    backward_tile: Optional[int] = None

    def __post_init__(self) -> None:
        self._check_encoder()
        if self.channels is None:
            self.channels = ENCODER_CHANNELS.get(self.encoder, 16)
        _check_int("channels", self.channels, 1)
        if self.encoder != "none" and self.channels != ENCODER_CHANNELS[self.encoder]:
            raise ValueError(
                f"PyramidFlowConfig: encoder={self.encoder!r} gives {ENCODER_CHANNELS[self.encoder]} feature channels "
                f"but channels={self.channels}; set channels={ENCODER_CHANNELS[self.encoder]} or leave it unset."
            )
        _check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 != 1:
            raise ValueError(
                f"PyramidFlowConfig: kernel_size must be odd (so the convs keep the size), got {self.kernel_size}; "
                f"use {self.kernel_size + 1}."
            )
        _check_int("num_stacks", self.num_stacks, 1)
        _check_int("num_levels", self.num_levels, 2)
        _check_int("in_channels", self.in_channels, 1)
        if self.hidden_channels is not None:
            _check_int("hidden_channels", self.hidden_channels, 1)
        if self.volume_norm not in VOLUME_NORM_CHOICES:
            raise ValueError(f"PyramidFlowConfig: volume_norm must be one of {VOLUME_NORM_CHOICES}, got {self.volume_norm!r}.")
        for name, choices in (("template", TEMPLATES), ("difference", DIFFERENCES), ("loss", LOSSES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"PyramidFlowConfig: {name} must be one of {choices}, got {getattr(self, name)!r}.")
        if isinstance(self.loss_p, bool) or not isinstance(self.loss_p, (int, float)) or not self.loss_p >= 1:
            raise ValueError(
                f"PyramidFlowConfig: loss_p must be a number of at least 1 (below 1 the gradient of |z_a - z_b|**p is "
                f"infinite where the latents agree), got {self.loss_p!r}; use 2 (the method) or 1."
            )
        for name, method in (("loss", "fourier"), ("loss_p", 2)):
            if self.volume_norm is None and getattr(self, name) != method:
                raise ValueError(
                    f"PyramidFlowConfig: {name}={getattr(self, name)!r} needs volume normalisation; without it "
                    f"(volume_norm=None) the flow trains with the Gaussian negative log-likelihood, so keep "
                    f"{name}={method!r} or set volume_norm."
                )
        if self.mode not in MODES:
            raise ValueError(f"PyramidFlowConfig: mode must be one of {MODES}, got {self.mode!r}.")
        if not (isinstance(self.clamp, (int, float)) and self.clamp > 0):
            raise ValueError(f"PyramidFlowConfig: clamp must be a positive number, got {self.clamp!r}.")
        if not (isinstance(self.momentum, (int, float)) and 0 < self.momentum <= 1):
            raise ValueError(f"PyramidFlowConfig: momentum must lie in (0, 1], got {self.momentum!r}.")
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"PyramidFlowConfig: downsample must be one of {DOWNSAMPLES}, got {self.downsample!r}.")
        if self.kernels not in BACKENDS:
            raise ValueError(f"PyramidFlowConfig: kernels must be one of {BACKENDS}, got {self.kernels!r}.")
        if self.conv1x1_init not in CONV1X1_INITS:
            raise ValueError(f"PyramidFlowConfig: conv1x1_init must be one of {CONV1X1_INITS}, got {self.conv1x1_init!r}.")
        self._check_backward_tile()

    def _check_backward_tile(self) -> None:
        if self.backward_tile is None:
            return
        _check_int("backward_tile", self.backward_tile, 1)
        check_tile_support(self.backward_tile, self.volume_norm, "PyramidFlowConfig")
        check_tile_alignment(self.backward_tile, self.num_levels - 1, "PyramidFlowConfig", "num_levels - 1")

    def _check_encoder(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"PyramidFlowConfig: encoder must be one of {ENCODERS}, got {self.encoder!r}.")
        if isinstance(self.encoder_weights, os.PathLike):
            self.encoder_weights = os.fspath(self.encoder_weights)  # plain values only: checkpoints load weights_only
        if self.encoder_weights is not None and not isinstance(self.encoder_weights, str):
            raise TypeError(
                f"PyramidFlowConfig: encoder_weights must be 'imagenet', a path or None, got "
                f"{type(self.encoder_weights).__name__} ({self.encoder_weights!r})."
            )
        if self.encoder == "none" and self.encoder_weights is not None:
            raise ValueError(
                f"PyramidFlowConfig: encoder_weights={self.encoder_weights!r} is set but encoder='none'; set "
                "encoder='resnet18' or drop encoder_weights."
            )
        if self.encoder != "none" and not self.encoder_weights:
            raise ValueError(
                f"PyramidFlowConfig: encoder={self.encoder!r} needs encoder_weights: 'imagenet' (torchvision's ImageNet "
                "weights, downloaded; `pip install -e '.[encoders]'`) or the PATH of a local ResNet18 state dict "
                "(offline machines)."
            )
        if self.encoder != "none" and self.in_channels != 3:
            raise ValueError(
                f"PyramidFlowConfig: encoder={self.encoder!r} takes RGB images but in_channels={self.in_channels}; "
                "set in_channels=3."
            )

    @property
    def input_stride(self) -> int:
        """Image side over feature side: 1 for the lift, 4 for ``"resnet18"``."""
        return ENCODER_STRIDES.get(self.encoder, 1)

    @property
    def objective(self) -> str:
        """What training minimises: ``loss`` (``"fourier"`` or ``"spatial"``) with volume normalisation,
        ``"gaussian_nll"`` without it (a flow that may change volume would shrink every latent to zero under a
        pairwise loss; the paper's "without VN" ablation trains it as a plain flow)."""
        return "gaussian_nll" if self.volume_norm is None else self.loss

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: ``input_stride * 2**(num_levels - 1)``."""
        return self.input_stride * 2 ** (self.num_levels - 1)

    def nearest_valid_size(self, size: int) -> int:
        """The multiple of :attr:`size_multiple` nearest to ``size`` (ties round up), at least one multiple."""
        return nearest_valid_side(size, self.num_levels, self.input_stride)

    def check_image_size(self, height: int, width: int, where: str = "PyramidFlow") -> None:
        """Raise a ValueError naming the nearest valid size when images of ``height×width`` do not fit."""
        check_image_size(height, width, self.num_levels, where=where, stride=self.input_stride)

    @classmethod
    def for_category(cls, name: str, **overrides) -> "PyramidFlowConfig":
        """The authors' settings for an MVTec AD category, with ``overrides`` on top.

        SVN for carpet, grid, bottle and transistor (CVN otherwise); 8 levels
        for metal_nut, carpet and transistor, 2 for screw (4 otherwise). Any
        other name (BTAD classes, your own folders) gets the defaults.

        Args:
            name: category name, case-insensitive (e.g. ``"carpet"``).
            **overrides: any field of the config.
        """
        key = str(name).strip().lower()
        settings = dict(
            volume_norm="SVN" if key in _SVN_CATEGORIES else "CVN",
            num_levels=_LEVELS_BY_CATEGORY.get(key, 4),
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"PyramidFlowConfig.for_category: unknown setting(s) {sorted(unknown)}.")
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def for_texture(cls, **overrides) -> "PyramidFlowConfig":
        """The texture recipe's settings for a texture of one's own (``train --texture``), ``overrides`` on top.

        The defaults with 2 pyramid levels: on photographed textures (the development set of real textures,
        benchmarks/README.md) 2 levels localised better than 3 or 4 at the same training steps (AUPRO higher on
        every texture). Augmentation is the training's (``TrainConfig.augment``), off in the recipe: flips and
        rotations did not win on every photographed texture. The authors' categories keep their own settings
        (:meth:`for_category`).

        Example:
            >>> PyramidFlowConfig.for_texture().num_levels
            2
        """
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"PyramidFlowConfig.for_texture: unknown setting(s) {sorted(unknown)}.")
        return cls(**{**_TEXTURE_SETTINGS, **overrides})


def stack_layout(num_levels: int) -> List[Tuple[str, int]]:
    """The blocks of one stack, in order, as ``(kind, start)`` pairs (Sec. 3.2).

    Pass A covers starts 0, 2, 4, …; pass B puts an ``"up"`` two-level block on
    levels (0, 1) first, then covers starts 1, 3, 5, …. At each start the block
    is ``"three"`` if ``start + 2 < L``, else ``"down"`` if ``start + 1 < L``,
    else none. Every level is transformed exactly once per stack.

    Example:
        >>> stack_layout(4)
        [('three', 0), ('down', 2), ('up', 0), ('three', 1)]
    """
    if num_levels < 2:
        raise ValueError(f"stack_layout: num_levels must be at least 2, got {num_levels}.")

    def cover(starts: range) -> List[Tuple[str, int]]:
        layout = []
        for start in starts:
            if start + 2 < num_levels:
                layout.append(("three", start))
            elif start + 1 < num_levels:
                layout.append(("down", start))
        return layout

    return cover(range(0, num_levels, 2)) + [("up", 0)] + cover(range(1, num_levels, 2))


def _make_block(kind: str, start: int, config: PyramidFlowConfig) -> PyramidCoupling:
    kwargs = dict(
        hidden_channels=config.hidden_channels,
        kernel_size=config.kernel_size,
        volume_norm=config.volume_norm,
        clamp=config.clamp,
        momentum=config.momentum,
        conv1x1_init=config.conv1x1_init,
        backend=config.kernels,
        tile=config.backward_tile,
    )
    if kind == "three":
        return ThreeLevelCoupling(start, config.channels, **kwargs)
    return TwoLevelCoupling(start, kind, config.channels, **kwargs)


class InputLift(nn.Module):
    """The frozen, semi-invertible input lift: a 1×1 conv from ``in_channels`` to C channels.

    Orthogonally initialised and never trained (its weight has
    ``requires_grad=False`` and it runs under no-grad). With C ≥ in_channels
    its columns are orthonormal, so the least-squares inverse (the
    pseudo-inverse) recovers the image exactly from lifted features.

    Args:
        in_channels: channels of the images (3).
        channels: C.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        if channels < in_channels:
            raise ValueError(
                f"InputLift: channels ({channels}) must be at least in_channels ({in_channels}) for the lift to be "
                f"invertible; set channels >= {in_channels}."
            )
        weight = torch.empty(channels, in_channels)
        nn.init.orthogonal_(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, images: Tensor) -> Tensor:
        """``(N, in, H, W)`` -> ``(N, C, H, W)``, without a graph."""
        with torch.no_grad():
            return F.conv2d(images, self.weight.to(images.dtype)[:, :, None, None])

    def inverse(self, features: Tensor) -> Tensor:
        """Least-squares inverse: ``(N, C, H, W)`` -> ``(N, in, H, W)``."""
        pinv = torch.linalg.pinv(self.weight.to(features.dtype))
        return F.conv2d(features, pinv[:, :, None, None])


class PyramidFlow(nn.Module):
    """The PyramidFlow model: images to a latent pyramid and back.

    All blocks of all stacks live in one :class:`InvertibleSequential` run in
    the config's mode (``model.mode`` reads and sets it), so in the default
    ``"invertible"`` mode training keeps no activation of the flow.

    Args:
        config: the settings; ``None`` for the defaults.
        encoder: optional frozen ``nn.Module`` mapping images ``(N, 3, H', W')``
            to features ``(N, C, H, W)`` in place of the lift (e.g. a pretrained
            CNN stem). Its parameters are frozen, it stays in eval mode and
            runs under no-grad. It has no inverse: :meth:`inverse` then raises
            NotImplementedError, and :meth:`inverse_features` gives the features.
            ``None`` builds the one the config names (``config.encoder``, loading
            ``config.encoder_weights``), or the lift for ``encoder="none"``.

    Example:
        >>> model = PyramidFlow(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=2))
        >>> latents = model(torch.randn(2, 3, 16, 16))
        >>> [tuple(z.shape) for z in latents]
        [(2, 4, 16, 16), (2, 4, 8, 8)]
    """

    def __init__(self, config: Optional[PyramidFlowConfig] = None, encoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        if config is None:
            config = PyramidFlowConfig()
        if not isinstance(config, PyramidFlowConfig):
            raise TypeError(f"PyramidFlow: config must be a PyramidFlowConfig, got {type(config).__name__}.")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"PyramidFlow: encoder must be an nn.Module or None, got {type(encoder).__name__}.")
        self.config = config
        if encoder is None:
            encoder = build_encoder(config.encoder, config.encoder_weights)  # None for encoder="none"
        if encoder is None:
            self.lift: Optional[InputLift] = InputLift(config.in_channels, config.channels)
            self.encoder: Optional[nn.Module] = None
        else:
            self.lift = None
            self.encoder = encoder.requires_grad_(False).eval()
        self.pyramid = LaplacianPyramid(config.num_levels, config.downsample)
        layout = stack_layout(config.num_levels)
        blocks = [_make_block(kind, start, config) for _ in range(config.num_stacks) for kind, start in layout]
        self.flow = InvertibleSequential(*blocks, mode=config.mode)

    @property
    def mode(self) -> str:
        """The engine's mode: ``"invertible"``, ``"checkpoint"`` or ``"autograd"``."""
        return self.flow.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.flow.mode = mode  # the config keeps describing how the model was built

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    def train(self, mode: bool = True) -> "PyramidFlow":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: batch-norm statistics and dropout stay as given
        return self

    def reset_running_stats(self) -> None:
        """Forget every volume-normalisation running mean (e.g. before training at a new resolution)."""
        for block in self.flow.blocks:
            block.volume_norm.reset_running_stats()

    def synchronize_volume_norm(self, process_group) -> None:
        """Normalise every coupling with the batch mean of all ranks (data-parallel training; ``None`` undoes it)."""
        check_tile_unsynchronised(self.config.backward_tile, process_group, "PyramidFlow")
        for block in self.flow.blocks:
            block.volume_norm.synchronize(process_group)

    def features(self, images: Tensor) -> Tensor:
        """Lift (or encode) images ``(N, in, H, W)`` to features ``(N, C, H, W)``, without a graph."""
        if images.dim() != 4:
            raise ValueError(f"PyramidFlow: expected images of shape (N, C, H, W), got {tuple(images.shape)}.")
        if self.config.encoder != "none":
            self._check_input_size(images.shape[-2], images.shape[-1])
        if self.encoder is None:
            if images.shape[1] != self.config.in_channels:
                raise ValueError(
                    f"PyramidFlow: images have {images.shape[1]} channels but in_channels={self.config.in_channels}; "
                    "pass RGB images or set PyramidFlowConfig(in_channels=...)."
                )
            return self.lift(images)
        with torch.no_grad():
            features = self.encoder(images)
        if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[1] != self.config.channels:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"PyramidFlow: the encoder returned {shape}, expected (N, {self.config.channels}, H, W); set "
                "PyramidFlowConfig(channels=...) to the encoder's output channels."
            )
        return features

    def forward(self, images: Tensor, return_logdet: bool = False, *, release_outputs: bool = False):
        """Map images to their latent pyramid.

        Args:
            images: ``(N, 3, H, W)``, ImageNet-normalised; ``H`` and ``W`` divisible
                by ``2**(num_levels - 1)`` (after the encoder, if any).
            return_logdet: also return the flow's log-determinant ``(N,)`` (zeros with volume
                normalisation; the lift or encoder, frozen, is not counted).
            release_outputs: the caller will not read the latents once backward has started and
                feeds them to its loss alone (a training step): invertible backward then reuses
                their storage and their gradients' (:meth:`InvertibleSequential.forward`).

        Returns:
            ``num_levels`` latents, finest first; level ``i`` is ``(N, C, H / 2**i, W / 2**i)``;
            with ``return_logdet``, the pair ``(latents, logdet)``.

        Raises:
            ValueError: for a bad image size (naming the nearest valid one), or
                eval with CVN at another resolution than the training one.
        """
        features = self.features(images)
        self.pyramid.check_size(features.shape[-2], features.shape[-1])
        self._check_resolution(features.shape[-2], features.shape[-1])
        # Level 0 takes the lift's output's storage; a given encoder's output may alias what its caller keeps.
        levels = self.pyramid.decompose(features, consume_input=self.encoder is None)
        # The levels are the model's own (fresh, or the lift's output), unless one level is the encoder's output itself.
        own = self.encoder is None or not any(level is features for level in levels)
        del features
        latents, logdet = self.flow(levels, release_outputs=release_outputs, input_source=self._pyramid_source(images),
                                    consume_input=own)
        return (tuple(latents), logdet) if return_logdet else tuple(latents)

    def _pyramid_source(self, images: Tensor) -> Optional[Callable[[], Tuple[Tensor, ...]]]:
        """The flow's input computed again from ``images`` (NOTE [input source] in the engine): invertible
        backward then keeps no copy of the pyramid for drift recomputation, only the images the caller holds.
        ``None`` where no backward can follow (no grad, inference tensors)."""
        if not torch.is_grad_enabled() or images.is_inference():
            return None
        version = images._version

        def source() -> Tuple[Tensor, ...]:
            if images._version != version:
                raise ValueError(
                    "PyramidFlow: the images were modified in place between forward and backward; the flow's input "
                    "is computed again from them when a block drifts. Clone the images before changing them."
                )
            return self.pyramid.decompose(self.features(images))

        return source

    def inverse_features(self, latents: Sequence[Tensor]) -> Tensor:
        """Latent pyramid -> the features ``(N, C, H, W)`` it came from (flow inverse, then composition)."""
        if len(latents) != self.num_levels:
            raise ValueError(f"PyramidFlow.inverse: expected {self.num_levels} latent levels, got {len(latents)}.")
        levels, _ = self.flow.inverse(tuple(latents))
        return self.pyramid.compose(levels)

    def inverse(self, latents: Sequence[Tensor]) -> Tensor:
        """Latent pyramid -> images ``(N, 3, H, W)`` (least-squares through the lift).

        Raises:
            NotImplementedError: with an encoder, which has no inverse; use
                :meth:`inverse_features` for the encoder's feature map.
        """
        if self.lift is None:
            raise NotImplementedError(
                "PyramidFlow.inverse: the model uses an encoder, which has no inverse; call "
                "model.inverse_features(latents) to get the encoder's feature map instead."
            )
        return self.lift.inverse(self.inverse_features(latents))

    def anomaly_map(self, images: Tensor, template: Sequence[Tensor]) -> Tensor:
        """The anomaly map of ``images`` ``(N, 3, H, W)`` against ``template``: ``(N, 1, H, W)``.

        The one place that reads the config's ``difference`` switch: training statistics,
        calibration, evaluation, the Detector and the exported graph all take their maps from here,
        so that none of them can forget it.
        """
        return anomaly_map(self(images), template, tuple(images.shape[-2:]), difference=self.config.difference)

    def _check_input_size(self, height: int, width: int) -> None:
        """With an encoder the pyramid's rule applies to the features: images must be multiples of ``size_multiple``."""
        self.config.check_image_size(height, width)

    # NOTE [CVN resolution] (volume_norm.py): the same check, with image sizes in the message.
    def _check_resolution(self, height: int, width: int) -> None:
        if self.training or self.config.volume_norm != "CVN":
            return
        height, width = height * self.config.input_stride, width * self.config.input_stride  # features -> images
        for block in self.flow.blocks:
            trained = tuple(block.volume_norm.running_mean.shape)
            if len(trained) == 4:
                scale = 2**block.level * self.config.input_stride
                trained_size = (trained[-2] * scale, trained[-1] * scale)
                if trained_size != (height, width):
                    raise ValueError(
                        f"PyramidFlow: eval at size {height}×{width}, but the CVN running means were trained at "
                        f"{trained_size[0]}×{trained_size[1]}; resize the images to {trained_size[0]}×"
                        f"{trained_size[1]}, or train with volume_norm='SVN' to run at any size."
                    )
                return
