"""The invertible-backprop engine: generic, model-agnostic.

It knows only the block contract (:class:`InvertibleModule`); it never
imports the model, data or training code.
"""

from ._state import is_rebuilding, may_overwrite, replay_forward_rng
from .adapters import FrEIAAdapter, NormflowsAdapter, wrap
from .block import InvertibleModule, Writable
from .checks import BlockReport, InverseCheck, check_inverse, reconstruction_error
from .coupling import AffineCoupling
from .drift import DRIFT_POLICIES
from .errors import DriftError, DriftWarning, InvertibleError
from .sequential import MODES, InvertibleSequential

__all__ = [
    "DRIFT_POLICIES",
    "MODES",
    "AffineCoupling",
    "BlockReport",
    "DriftError",
    "DriftWarning",
    "FrEIAAdapter",
    "InverseCheck",
    "InvertibleError",
    "InvertibleModule",
    "Writable",
    "InvertibleSequential",
    "NormflowsAdapter",
    "check_inverse",
    "is_rebuilding",
    "may_overwrite",
    "reconstruction_error",
    "replay_forward_rng",
    "wrap",
]
