"""Pretrained feature encoders that can replace the input lift: the paper's ResNet18 variant.

The paper's best results use ResNet18's stem up to its first residual stage
(conv 7×7/2, batch norm, ReLU, max-pool 3×3/2, two basic blocks of 64 channels)
as a frozen feature extractor: images ``(N, 3, H, W)`` become features
``(N, 64, H/4, W/4)``, so a 1024 px image gives a 256 × 256 × 64 map and the
flow runs at width C = 64. The module here has the same layers under the same
parameter names as torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1.*``),
so torchvision's state dicts load into it; torchvision itself is needed only to
download the ImageNet weights (``pip install -e '.[encoders]'``).

# NOTE [frozen encoder]
The encoder is always in eval mode and its parameters never need gradients:
its batch-norm statistics stay those of the weights it was loaded with (the
authors' code lets them drift with the training images; we do not), and it
runs under no-grad inside :meth:`PyramidFlow.features`. Its weights are part
of the model's ``state_dict``, so a checkpoint carries them (about 0.6 MB) and
``eval`` / ``predict`` rebuild the encoder without the original weights file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ENCODERS",
    "ENCODER_CHANNELS",
    "ENCODER_STRIDES",
    "ResNet18Stem",
    "build_encoder",
    "encoder_skeleton",
    "load_encoder_weights",
]

ENCODERS = ("none", "resnet18")
ENCODER_CHANNELS = {"resnet18": 64}  # C of the features each encoder gives
ENCODER_STRIDES = {"resnet18": 4}  # input side / feature side

_WEIGHTS_HINT = (
    "encoder_weights='imagenet' (torchvision's ImageNet weights, downloaded; needs `pip install -e '.[encoders]'`) "
    "or encoder_weights=PATH (a local ResNet18 state dict saved with torch.save(model.state_dict(), PATH), "
    "for offline machines)"
)


class _BasicBlock(nn.Module):
    """ResNet's basic block at constant width: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet18Stem(nn.Module):
    """ResNet18 up to its first residual stage, frozen: ``(N, 3, H, W)`` -> ``(N, 64, H/4, W/4)``.

    Layers and parameter names are those of torchvision's ``resnet18``
    (``conv1``, ``bn1``, ``layer1.0.*``, ``layer1.1.*``). Built with random
    weights (He-normal convs, unit batch norms); load real ones with
    :func:`load_encoder_weights`. See ``NOTE [frozen encoder]``.

    Example:
        >>> ResNet18Stem()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 64, 16, 16])
    """

    channels = ENCODER_CHANNELS["resnet18"]
    stride = ENCODER_STRIDES["resnet18"]

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, self.channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.channels)
        self.layer1 = nn.Sequential(_BasicBlock(self.channels), _BasicBlock(self.channels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ResNet18Stem":
        """Stays in eval mode whatever is asked (``NOTE [frozen encoder]``)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.layer1(x)


def encoder_skeleton(name: str) -> Optional[nn.Module]:
    """The encoder ``name`` with random weights (``None`` for ``"none"``), e.g. to load a checkpoint into."""
    if name == "none":
        return None
    if name == "resnet18":
        return ResNet18Stem()
    raise ValueError(f"encoder must be one of {ENCODERS}, got {name!r}.")


def build_encoder(name: str, weights: Optional[str | os.PathLike]) -> Optional[nn.Module]:
    """The encoder ``name`` with its weights loaded from ``weights`` (``None`` for ``"none"``).

    Args:
        name: one of :data:`ENCODERS`.
        weights: ``"imagenet"`` or the path of a local state dict (see :func:`load_encoder_weights`).

    Raises:
        ValueError: unknown encoder, no weights given, or a weights file that does not fit.
        FileNotFoundError: no file at the weights path.
        RuntimeError: ``"imagenet"`` without a usable torchvision, or the download failed.
    """
    encoder = encoder_skeleton(name)
    if encoder is None:
        return None
    if weights is None:
        raise ValueError(f"encoder={name!r} needs weights: pass {_WEIGHTS_HINT}.")
    return load_encoder_weights(encoder, weights)


def load_encoder_weights(encoder: ResNet18Stem, weights: str | os.PathLike) -> ResNet18Stem:
    """Load ``"imagenet"`` or a local state dict into a :class:`ResNet18Stem`, and return it (frozen, eval).

    A local file may hold a full ``resnet18`` state dict in torchvision's layout (``layer2``-``layer4``
    and ``fc`` are ignored) or the stem's own keys only (``ResNet18Stem().state_dict()``); it is read
    with ``torch.load(..., weights_only=True)``, so opening it never runs code.

    Raises:
        FileNotFoundError: no file at the path.
        ValueError: the file is unreadable, not a state dict, or lacks keys / has other shapes.
        RuntimeError: ``"imagenet"`` without a usable torchvision, or the download failed.
    """
    if isinstance(weights, str) and weights == "imagenet":
        state, source = _imagenet_state_dict(), "torchvision's ImageNet weights"
    else:
        path = Path(weights)
        state, source = _read_state_dict(path), str(path)
    expected = encoder.state_dict()
    stem = {key: value for key, value in state.items() if key in expected}
    missing = [key for key in expected if key not in stem and not key.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"encoder weights {source}: not a ResNet18 state dict, it lacks {shown}; pass torchvision's resnet18 "
            "state dict (or ResNet18Stem().state_dict()) saved with torch.save."
        )
    for key, value in stem.items():
        if not isinstance(value, Tensor) or value.shape != expected[key].shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"encoder weights {source}: {key} is {got} but ResNet18 has {tuple(expected[key].shape)}; "
                "pass the weights of a ResNet18 (not another ResNet)."
            )
    encoder.load_state_dict(stem, strict=False)  # missing num_batches_tracked: see the check above
    return encoder.requires_grad_(False).eval()


def _read_state_dict(path: Path) -> Dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights: no file at {path}; pass {_WEIGHTS_HINT}.")
    from .._torch_file import read_torch_file

    state = read_torch_file(path, "encoder_weights", "save the state dict with torch.save(model.state_dict(), PATH).")
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ValueError(
            f"encoder_weights: {path} holds a {type(state).__name__}, not a state dict; save it with "
            "torch.save(model.state_dict(), PATH)."
        )
    return state


def _imagenet_state_dict() -> Dict[str, Tensor]:
    """torchvision's ImageNet ResNet18 weights (IMAGENET1K_V1), downloaded into torch's hub cache."""
    try:
        from torchvision.models import ResNet18_Weights
    except Exception as error:  # ImportError, or RuntimeError from a torchvision built for another torch
        message = " ".join(str(error).split()) or type(error).__name__
        raise RuntimeError(
            f"encoder_weights='imagenet' needs a torchvision that matches your torch ({message}); install it with "
            "`pip install -e '.[encoders]' torch==<your torch version>`, or pass encoder_weights=PATH of a local "
            "ResNet18 state dict."
        ) from None
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as error:  # URLError / OSError offline, HTTP errors, a damaged download
        message = " ".join(str(error).split()) or type(error).__name__
        raise RuntimeError(
            f"encoder_weights='imagenet': cannot download torchvision's ResNet18 weights ({message}); on an offline "
            "machine copy a saved resnet18 state dict there and pass encoder_weights=PATH."
        ) from None
