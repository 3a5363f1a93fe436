"""The PyramidFlow model: pure nn.Modules and functions, no training code.

``PyramidFlow(config)`` maps images to a latent pyramid; :func:`fourier_loss`
trains it on pairs of normal images (:func:`spatial_loss` and :func:`gaussian_nll`
are the paper's ablations); :func:`fit_template`, :func:`anomaly_map`
and :func:`image_score` turn latents into heat maps and scores.
"""

from .anomaly_map import anomaly_map, fit_template, image_score
from .conv1x1 import InvertibleConv1x1
from .coupling import AffineParameterNet, PyramidCoupling, ThreeLevelCoupling, TwoLevelCoupling
from .loss import fourier_loss, gaussian_nll, pairwise_difference_maps, spatial_loss
from .pyramid import LaplacianPyramid, laplacian_compose, laplacian_decompose
from .pyramidflow import InputLift, PyramidFlow, PyramidFlowConfig, stack_layout
from .volume_norm import VolumeNorm

__all__ = [
    "PyramidFlow",
    "PyramidFlowConfig",
    "InputLift",
    "stack_layout",
    "LaplacianPyramid",
    "laplacian_decompose",
    "laplacian_compose",
    "PyramidCoupling",
    "TwoLevelCoupling",
    "ThreeLevelCoupling",
    "AffineParameterNet",
    "InvertibleConv1x1",
    "VolumeNorm",
    "fourier_loss",
    "spatial_loss",
    "gaussian_nll",
    "pairwise_difference_maps",
    "fit_template",
    "anomaly_map",
    "image_score",
]
