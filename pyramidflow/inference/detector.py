"""The Python API for inspection: a trained checkpoint as a callable that returns decisions.

``Detector.load("runs/nut/checkpoint.pt")`` opens a finished checkpoint; calling the detector on
images (paths, PIL images, ``(H, W, 3)`` uint8 arrays, ``(N, 3, H, W)`` tensors, or a list of them)
returns one :class:`Prediction` per image: the score, the yes/no against the calibrated image
threshold, the anomaly map at the input's resolution, the binary mask at the pixel threshold, and
the defect regions. Maps come from :func:`pyramidflow.inference.maps.anomaly_maps`, as in ``eval`` and
``predict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..calibration import check_threshold, stored_mask_rule, stored_thresholds
from ..data._io import check_bit_depth, load_rgb, upright
from ..data.transforms import image_to_tensor
from .._utils import resolve_device
from ..pixel_threshold import MaskRule
from .maps import Inference, anomaly_maps, check_smoothing_sigma, load_for_inference, smooth
from .registration import stored_reference
from .regions import find_regions
from .tiling import check_tileable, tiled_anomaly_map

__all__ = ["Detector", "Prediction"]


@dataclass
class Prediction:
    """The decision for one image.

    Attributes:
        score: the image score (maximum of the map at the model's resolution, or of the blended map
            when tiled).
        is_anomalous: ``score > image threshold``.
        anomaly_map: ``(H, W)`` float32 map at the input's resolution.
        mask: ``(H, W)`` bool, the defect pixels by the checkpoint's mask rule
            (:class:`pyramidflow.pixel_threshold.MaskRule`); never empty when ``is_anomalous``.
        regions: connected regions of ``mask``: ``{"bbox": [x0, y0, x1, y1], "area", "peak"}``, largest
            peak first (see :func:`pyramidflow.inference.regions.find_regions`); at least one when
            ``is_anomalous``.
        path: the source file, or ``"<array 3>"`` style names for in-memory inputs.
    """

    score: float
    is_anomalous: bool
    anomaly_map: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    regions: List[dict]
    path: str = ""


def _to_rgb(item: Any, name: str, bit_depth: Optional[int]) -> Image.Image:
    """One input as an RGB PIL image (uint8 tensors and arrays, and float tensors in [0, 1], become 8-bit pixels)."""
    if isinstance(item, (str, Path)):
        return load_rgb(Path(item), "Detector", bit_depth)
    if isinstance(item, Image.Image):  # as viewers show it, like a file (NOTE [images as viewers show them])
        item = upright(item)
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ValueError(f"Detector: {name} is a tensor of shape {tuple(item.shape)}; give (3, H, W) or (N, 3, H, W).")
        array = item.detach().cpu()
        if array.is_floating_point():
            array = _float_pixels(array, name)
        elif array.dtype != torch.uint8:
            raise TypeError(
                f"Detector: {name} is a {array.dtype} tensor; give RGB as uint8 (0-255) or as a float tensor in [0, 1]."
            )
        return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(
                f"Detector: {name} is an array of shape {item.shape} and dtype {item.dtype}; give (H, W, 3) uint8 RGB."
            )
        return Image.fromarray(item)
    raise TypeError(
        f"Detector: cannot read {name} of type {type(item).__name__}; give a path, a PIL image, an (H, W, 3) uint8 "
        "array, an (N, 3, H, W) tensor (RGB in [0, 1] or uint8), or a list of them."
    )


def _float_pixels(image: torch.Tensor, name: str) -> torch.Tensor:
    """A float ``(3, H, W)`` image in [0, 1] as uint8; anything else is refused rather than clamped.

    Clamping would read a 0-255 image as white and NaN as black: a wrong answer without a word.
    """
    image = image.float()
    if image.isnan().any():
        raise ValueError(f"Detector: {name} holds NaN pixels; give finite RGB values in [0, 1].")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Detector: {name} is a float tensor with values in [{low:g}, {high:g}], but float images must be RGB "
            f"in [0, 1]; divide 0-255 pixels by 255 (or pass a uint8 tensor), and undo any normalisation."
        )
    return (image * 255).round().to(torch.uint8)


def _flatten(images: Any) -> List[Tuple[str, Any]]:
    """``(name, item)`` for every image in ``images``; a 4-D tensor is N images."""
    items = images if isinstance(images, (list, tuple)) else [images]
    out: List[Tuple[str, Any]] = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim == 4:
            out.extend((f"<tensor {len(out) + i}>", image) for i, image in enumerate(item))
        elif isinstance(item, (str, Path)):
            out.append((str(item), item))
        else:
            out.append((f"<{type(item).__name__} {len(out)}>", item))
    if not out:
        raise ValueError("Detector: no images given.")
    return out


class Detector:
    """A finished checkpoint that turns images into decisions.

    The thresholds default to those calibrated on held-out good images at training time
    (:mod:`pyramidflow.calibration`); set ``detector.threshold`` (image) or ``detector.pixel_threshold``
    to change them. Images are resized to the trained size, unless ``tile=True``: then an image at least
    the trained size is processed at its own resolution in overlapping tiles (:mod:`pyramidflow.inference.tiling`).
    Runs in batches under ``torch.inference_mode``.

    Args:
        inference: from :func:`pyramidflow.inference.evaluate.load_for_inference`.
        tile: tiled inference at the input's resolution.
        batch_size: images (or tiles) per forward pass.
        smoothing_sigma: Gaussian smoothing of the maps in pixels (0: off, as at calibration; at most the
            trained image's larger side).
        bit_depth: significant bits of 16-bit image files (8..16); ``None`` reads them as training did
            (``NOTE [bit depth]`` in :mod:`pyramidflow.data._io`).
        register: align each image to the training images before the map (rotation and translation,
            :mod:`pyramidflow.inference.registration`); maps and masks stay in the input's coordinates.
            Needs the checkpoint's registration reference; not with ``tile=True``.

    Example:
        >>> import tempfile, numpy as np
        >>> from pyramidflow import Detector
        >>> from pyramidflow.data import MVTecDataset, synthetic
        >>> from pyramidflow.model import PyramidFlowConfig
        >>> from pyramidflow.train import TrainConfig, train
        >>> root = synthetic.generate(tempfile.mkdtemp(), size=32, categories=("nut",), num_train=6, num_test=1)
        >>> config = PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3)
        >>> run = train(config, TrainConfig(steps=2, device="cpu"), MVTecDataset(root, "nut", split="train", size=32),
        ...             tempfile.mkdtemp(), progress=False)
        >>> detector = Detector.load(run.checkpoint_path)
        >>> [p] = detector(np.zeros((48, 40, 3), dtype=np.uint8))
        >>> p.anomaly_map.shape, p.mask.shape, type(p.is_anomalous)
        ((48, 40), (48, 40), <class 'bool'>)
        >>> detector.threshold = p.score + 1.0
        >>> detector(np.zeros((48, 40, 3), dtype=np.uint8))[0].is_anomalous
        False
    """

    def __init__(self, inference: Inference, *, tile: bool = False, batch_size: int = 8, smoothing_sigma: float = 0.0,
                 bit_depth: Optional[int] = None, register: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Detector: batch_size must be a positive int, got {batch_size!r}.")
        if register and tile:
            raise NotImplementedError(
                "Detector: register=True aligns a whole image at the trained size and cannot be combined with "
                "tile=True; use one or the other."
            )
        self._reference = stored_reference(inference.checkpoint, "Detector").to(inference.device) if register else None
        self.inference = inference
        self.tile = bool(tile)
        self.batch_size = batch_size
        self.smoothing_sigma = check_smoothing_sigma(smoothing_sigma, inference.image_size, "Detector")
        self.bit_depth = inference.bit_depth if bit_depth is None else check_bit_depth(bit_depth, "Detector")
        self._threshold, self._pixel_threshold, _ = stored_thresholds(inference.checkpoint)
        self._mask_rule = stored_mask_rule(inference.checkpoint)

    @classmethod
    def load(cls, path: str | Path, device: Optional[str | torch.device] = None, **options: Any) -> "Detector":
        """Open a finished checkpoint; ``device`` ``None`` picks CUDA when present. ``options`` as in the class."""
        device = resolve_device("auto") if device is None else torch.device(device)
        if device.type == "cuda":
            resolve_device("cuda")  # one clear error when torch sees no CUDA device
        return cls(load_for_inference(path, device), **options)

    @property
    def threshold(self) -> float:
        """The image threshold: an image whose score is above it is anomalous."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value, "Detector.threshold", optional=False)

    @property
    def pixel_threshold(self) -> float:
        """The pixel threshold: pixels whose map value is above it form the mask (capped at the map's peak
        for a flagged image, ``NOTE [a flagged image has a mask]`` in :mod:`pyramidflow.pixel_threshold`)."""
        return self._pixel_threshold

    @pixel_threshold.setter
    def pixel_threshold(self, value: float) -> None:
        self._pixel_threshold = check_threshold(value, "Detector.pixel_threshold", optional=False)
        self._mask_rule = MaskRule.plain(self._pixel_threshold)  # a threshold one sets is the whole rule

    @property
    def image_size(self) -> Tuple[int, int]:
        """The trained input size ``(height, width)``."""
        return self.inference.image_size

    def _maps(self, images: torch.Tensor) -> np.ndarray:
        inference = self.inference
        return anomaly_maps(inference.model, inference.template, images.to(inference.device), self._reference)

    def _decide(self, path: str, score: float, native_map: np.ndarray) -> Prediction:
        is_anomalous = bool(score > self._threshold)
        mask = self._mask_rule(native_map, flagged=is_anomalous)
        return Prediction(score=float(score), is_anomalous=is_anomalous, anomaly_map=native_map,
                          mask=mask, regions=find_regions(mask, native_map), path=path)

    def __call__(self, images: Any) -> List[Prediction]:
        """One :class:`Prediction` per image, in order (a ``(N, 3, H, W)`` tensor counts as N images).

        Raises:
            ValueError: an unreadable image file (named), an input of the wrong shape, a float tensor
                outside [0, 1] or holding NaN, or (``tile=True``) an image smaller than the trained size.
            TypeError: an input of another type (or a tensor neither uint8 nor float).
        """
        named = [(name, _to_rgb(item, name, self.bit_depth)) for name, item in _flatten(images)]
        with torch.inference_mode():
            if self.tile:
                return [self._tiled(name, image) for name, image in named]
            predictions = []
            for first in range(0, len(named), self.batch_size):
                chunk = named[first:first + self.batch_size]
                batch = torch.stack([image_to_tensor(image, self.image_size) for _, image in chunk])
                maps = smooth(self._maps(batch), self.smoothing_sigma)
                for (name, image), model_map in zip(chunk, maps):
                    width, height = image.size
                    native = F.interpolate(torch.from_numpy(model_map)[None, None], size=(height, width),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
                    predictions.append(self._decide(name, float(model_map.max()), native))
            return predictions

    def _tiled(self, name: str, image: Image.Image) -> Prediction:
        width, height = image.size
        check_tileable(height, width, self.image_size, name)
        tensor = image_to_tensor(image, (height, width))
        native = tiled_anomaly_map(tensor, self.image_size, self._maps, batch_size=self.batch_size, name=name)
        native = smooth(native[None], self.smoothing_sigma)[0]
        return self._decide(name, float(native.max()), native)
