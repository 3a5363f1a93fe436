"""The anomaly maps of a finished checkpoint: THE images -> maps call and the data-set -> maps loop.

Everything in :mod:`pyramidflow.inference` that needs a map (evaluation, prediction, the
:class:`~pyramidflow.inference.detector.Detector`, tiling) takes it from :func:`anomaly_maps` or
:func:`predict_dataset`; both go through :meth:`pyramidflow.model.PyramidFlow.anomaly_map`, the one
place that reads the checkpoint's ablation switches. The exported graph calls the same method.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import Checkpoint, CheckpointError, load_checkpoint
from ..data import denormalize
from ..model import PyramidFlow, image_score

__all__ = ["Inference", "Predictions", "load_for_inference", "smooth", "anomaly_maps", "predict_dataset"]


@dataclass
class Predictions:
    """Anomaly maps and scores of a data set, in its order.

    Attributes:
        maps: ``(N, H, W)`` float32 anomaly maps at the model's input resolution.
        scores: ``(N,)`` image scores (max of each map, after smoothing).
        images: ``(N, H, W, 3)`` uint8 images as the model saw them (for overlays).
        masks: ``(N, H, W)`` ground truth in {0, 1} (zeros where unknown).
        labels: ``(N,)`` 0 normal, 1 anomalous, -1 unknown.
        paths: source file of each image.
        defect_types: folder name of each test image (``"good"`` for normal ones).
    """

    maps: np.ndarray
    scores: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    paths: List[str]
    defect_types: List[str]


@dataclass
class Inference:
    """A finished checkpoint ready to run: its contents, the model (eval mode) and the template, on one device."""

    checkpoint: Checkpoint
    model: PyramidFlow
    template: Tuple[torch.Tensor, ...]
    device: torch.device

    @property
    def image_size(self) -> Tuple[int, int]:
        """The input resolution the template belongs to: its finest level's, times the encoder's stride."""
        stride = self.model.config.input_stride
        return tuple(int(s) * stride for s in self.template[0].shape[-2:])

    @property
    def bit_depth(self) -> Optional[int]:
        """The bit depth training read 16-bit images at (``NOTE [bit depth]`` in :mod:`pyramidflow.data._io`).

        ``None``: each file's own depth, also for checkpoints that predate the setting.
        """
        return (self.checkpoint.train_config or {}).get("bit_depth")


def load_for_inference(path: str | Path, device: torch.device) -> Inference:
    """Model (eval mode) and template of a finished checkpoint, on ``device``.

    Raises:
        CheckpointError: a damaged file, or a run that stopped before its template was computed.
    """
    checkpoint = load_checkpoint(path)
    if not checkpoint.finished or checkpoint.template is None:
        raise CheckpointError(
            f"{path}: training stopped at step {checkpoint.step} before it finished, so there is no template "
            "yet; continue it with `pyramidflow train ... --resume`."
        )
    model = checkpoint.build_model(device)
    template = tuple(level.to(device) for level in checkpoint.template)
    return Inference(checkpoint, model, template, device)


def check_smoothing_sigma(sigma: float, image_size: Sequence[int], where: str) -> float:
    """``sigma`` as a float: finite, at least 0, and at most the image's larger side (in pixels).

    A larger sigma flattens a map to its mean and makes scipy build a kernel of ``8 * sigma`` pixels
    (``1e9`` asks for tens of GiB); a negative or NaN one would silently mean no smoothing.

    Raises:
        ValueError: any other value, naming ``--smooth``.
    """
    bound = max(int(s) for s in image_size)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 <= sigma <= bound:
        raise ValueError(
            f"{where}: smoothing_sigma (--smooth) must be a number of pixels from 0 (off) to {bound} (the image's "
            f"larger side), got {sigma!r}."
        )
    return float(sigma)


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``(N, H, W)`` maps, per map (``sigma`` in pixels; 0 leaves them as they are)."""
    if sigma <= 0:
        return maps
    return np.stack([ndimage.gaussian_filter(m, sigma=sigma, mode="nearest") for m in maps])


@torch.no_grad()
def anomaly_maps(model: PyramidFlow, template: Sequence[torch.Tensor], images: torch.Tensor,
                 reference: Optional[torch.Tensor] = None) -> np.ndarray:
    """``(N, H, W)`` float32 maps of normalised images ``(N, 3, H, W)`` at the model's resolution (eval, no grad).

    With a ``reference`` ``(3, H, W)``, each image is first aligned to it and its map returned in the
    image's own coordinates (:func:`pyramidflow.inference.registration.registered_maps`).
    """
    if reference is not None:
        from .registration import registered_maps

        return registered_maps(lambda aligned: anomaly_maps(model, template, aligned), images, reference)
    return model.anomaly_map(images, template)[:, 0].float().cpu().numpy()


@torch.no_grad()
def predict_dataset(
    model: PyramidFlow,
    template: Sequence[torch.Tensor],
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 8,
    smoothing_sigma: float = 0.0,
    progress: bool = True,
    reference: Optional[torch.Tensor] = None,
) -> Predictions:
    """Anomaly maps and scores of every item of ``dataset`` (dicts with ``image``, ``mask``, ``label``, ``path``).

    ``reference``: align each image to it first (:mod:`pyramidflow.inference.registration`); ``None``: no registration.
    """
    from tqdm.auto import tqdm

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    maps, images, masks, labels, paths, kinds = [], [], [], [], [], []
    for batch in tqdm(loader, desc="anomaly maps", unit="batch", disable=not progress, leave=False):
        maps.append(anomaly_maps(model, template, batch["image"].to(device), reference))
        images.append(denormalize(batch["image"]))
        masks.append(batch["mask"][:, 0].numpy())
        labels.append(np.asarray(batch["label"]))
        paths.extend(batch["path"])
        kinds.extend(batch.get("defect_type", ["unknown"] * len(batch["path"])))
    if not maps:
        raise ValueError("predict_dataset: the data set is empty; point it at a folder with test images.")
    all_maps = smooth(np.concatenate(maps), smoothing_sigma)
    scores = image_score(torch.from_numpy(all_maps)[:, None]).numpy()
    return Predictions(all_maps, scores, np.concatenate(images), np.concatenate(masks), np.concatenate(labels), paths, kinds)
