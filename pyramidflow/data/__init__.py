"""Data sets (MVTec AD, BTAD, a generic folder layout), transforms, and the synthetic set generator.

Every data set is a ``torch.utils.data.Dataset`` of dicts with ``image`` (float32 ``(3, H, W)``,
ImageNet-normalised), ``mask`` (float32 ``(1, H, W)`` in {0, 1}), ``label`` (0 good, 1 defect, -1
unknown), ``path`` and ``defect_type``.
"""

from pyramidflow.data import synthetic
from pyramidflow.data._io import IMAGE_EXTENSIONS, UNKNOWN_LABEL, AnomalyDataset, Sample
from pyramidflow.data.btad import BTAD_CATEGORIES, BTADDataset
from pyramidflow.data.folder import FolderDataset
from pyramidflow.data.mvtec import MVTEC_CATEGORIES, MVTEC_TEXTURES, MVTecDataset, is_texture_category
from pyramidflow.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

__all__ = [
    "AnomalyDataset",
    "BTADDataset",
    "BTAD_CATEGORIES",
    "FolderDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "MVTEC_TEXTURES",
    "MVTecDataset",
    "Sample",
    "UNKNOWN_LABEL",
    "denormalize",
    "is_texture_category",
    "synthetic",
]
