"""The memory layout a coupling's recorded subnet evaluation runs in: channels-last for convolution subnets on CPU
(NOTE [channels-last rebuild]).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .sample_chunks import treats_samples_alone

__all__ = ["rebuilds_channels_last", "as_channels_last"]

# NOTE [channels-last rebuild]
# On CPU, oneDNN runs a convolution on a tensor in the default (NCHW) layout by
# reordering its input, output and gradients into a blocked layout and back:
# scratch copies as large as the activations (a 64-channel hidden layer: four
# levels of 16 channels) and the time to write them. In the channels-last
# (NHWC) layout it runs on the tensors as they are. The coupling-aware rebuild
# (NOTE [recorded subnets] in .subnets) owns the leaf each subnet evaluation
# takes, so it may hand the subnet that leaf in channels-last; every module
# after it keeps the layout, and the subnet's outputs are made contiguous again,
# so that the block's own maths and the engine's levels see the layout they
# always see. Values are the same maths summed in another order (float
# rounding), as between any two convolution algorithms; the block's forward is
# untouched. Only subnets built wholly of modules whose result does not depend
# on the layout are changed: the modules NOTE [samples alone] in .sample_chunks
# knows (a known class in a mode that draws no random numbers: dropout in
# training mode draws its mask in memory order), with a 2-D convolution among
# them, on 4-D floating inputs. CUDA keeps its layout (not measured there).
_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)


def rebuilds_channels_last(subnet: nn.Module, inputs: Sequence[Tensor]) -> bool:
    """Whether the recorded evaluation of ``subnet`` on ``inputs`` runs channels-last (NOTE [channels-last rebuild])."""
    if not inputs or not all(x.dim() == 4 and x.is_floating_point() and x.device.type == "cpu" for x in inputs):
        return False
    return any(type(m) in _CONVOLUTIONS for m in subnet.modules()) and treats_samples_alone(subnet)


def as_channels_last(x: Tensor) -> Tensor:
    """``x`` in the channels-last layout, in a storage of its own (a copy unless it already is both)."""
    own = x.contiguous(memory_format=torch.channels_last)
    if own is x and x.untyped_storage().nbytes() > x.numel() * x.element_size():
        own = x.clone(memory_format=torch.channels_last)
    return own
