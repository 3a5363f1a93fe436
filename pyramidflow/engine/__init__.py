"""The invertible-backprop engine: generic, model-agnostic.

It knows only the block contract (:class:`InvertibleModule`); it never
imports the model, data or training code.
"""

from ._state import is_rebuilding, may_overwrite, replay_forward_rng
from .adapters import FrEIAAdapter, NormflowsAdapter, freia_blocks, wrap
from .block import CallContext, InvertibleModule, Writable
from .checks import BlockReport, InverseCheck, check_inverse, reconstruction_error
from .coupling import AffineCoupling
from .drift import DRIFT_POLICIES
from .foreign_couplings import COUPLING_CLASSES, register_coupling
from .errors import DriftError, DriftWarning, InvertibleError
from .sequential import MODES, InvertibleSequential

__all__ = [
    "COUPLING_CLASSES",
    "DRIFT_POLICIES",
    "MODES",
    "AffineCoupling",
    "BlockReport",
    "CallContext",
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
    "freia_blocks",
    "is_rebuilding",
    "may_overwrite",
    "reconstruction_error",
    "register_coupling",
    "replay_forward_rng",
    "wrap",
]
