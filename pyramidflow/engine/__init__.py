"""The invertible-backprop engine: generic, model-agnostic.

It knows only the block contract (:class:`InvertibleModule`); it never
imports the model, data or training code.
"""

from .adapters import FrEIAAdapter, NormflowsAdapter, wrap
from .block import InvertibleModule
from .checks import BlockReport, check_inverse, reconstruction_error
from .coupling import AffineCoupling
from .errors import InvertibleError
from .sequential import MODES, InvertibleSequential

__all__ = [
    "MODES",
    "AffineCoupling",
    "BlockReport",
    "FrEIAAdapter",
    "InvertibleError",
    "InvertibleModule",
    "InvertibleSequential",
    "NormflowsAdapter",
    "check_inverse",
    "reconstruction_error",
    "wrap",
]
