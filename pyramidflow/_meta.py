"""The samples a per-sample loop runs: all of them, except on the meta device (NOTE [samples on meta]).

Shared by the model's lean ops and the streamed pyramid, whose no-grad and
backward paths work one sample at a time to keep their temporaries small.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

__all__ = ["samples_to_run"]


# NOTE [samples on meta]
# The planner runs the real step on the meta device, where an op costs the
# same Python time whatever its size, so a loop over the samples of a batch
# of 170 costs 170 times one sample's ops for nothing. The loops that use
# this rule free what each sample made before the next sample's work is done
# (at most one sample's leftovers are alive while the next runs), and what
# stays (the batch-sized outputs and gradient accumulators) is made before
# the loop or by its first sample. On meta only the first and the last sample
# run: the first with nothing left by an earlier one, the last with what the
# one before it left, which has the shapes any sample's leftovers have; where
# a sample's temporaries grow or shrink with its index (the loss's pairs per
# image), the ends are the largest. So the peak is the same, and values never
# exist on meta, so none is skipped that matters. A loop whose samples keep
# what they make (appended to a list) must not use this rule.
def samples_to_run(batch: int, like: Tensor) -> Sequence[int]:
    """The sample indices a loop over ``batch`` samples of ``like`` runs: all, or on meta the first and last."""
    if like.is_meta and batch > 2:
        return (0, batch - 1)
    return range(batch)
