"""The invertible training step's work against autograd's: ATen calls and FLOPs, counted.

A step made of many small ops is slow on a busy CPU (each op is a parallel region) and launch-bound on
a GPU, and no unit test can time it; the counts do not depend on the machine's load. The floor of a lean invertible step
is forward F (no graph) + rebuild F + backward 2F = 4F against autograd's 3F: 1.33x in FLOPs.
``python benchmarks/step_work.py`` prints the same counts.

The bounds are what the step does now (issue 25's goals in brackets, where not reached): 17,606 calls
invertible, 27,414 tiled, against autograd's 12,334 (1.43x, 2.22x; ``python benchmarks/step_work.py``).
The coupling runs region by region with F's window ops on whole levels (NOTE [regions]), the reference
affine kernels cut tensors this small into few slices (NOTE [slices of the reference ops]), the drift
fingerprints project a level once however many blocks it passes through (NOTE [levels a block passes
through]), the 1x1 conv builds its factors in one gather (NOTE [the factors in one gather]), and the
affine ops clamp each element once per pass (NOTE [kept between the passes]). The
counts move by about 1% with what the process ran before, so the bounds sit 2-3% above them: a guard
against going back. The tiled step's extra FLOPs
are the network's pass that rebuilds each tiled block's input before its local backward under
drift="recompute" (NOTE [drift checked before the local backward]).
"""

import pytest

from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train.step import count_step_work

SIZE = 128  # the paper's configuration otherwise: C = 16, k = 7, 4 stacks, L = 4; batch 2, the training loop's settings


@pytest.fixture(scope="module")
def autograd():
    return count_step_work(PyramidFlowConfig(mode="autograd"), SIZE)


@pytest.mark.slow
def test_invertible_step_work(autograd):
    invertible = count_step_work(PyramidFlowConfig(mode="invertible"), SIZE)
    assert invertible.aten_calls <= 1.46 * autograd.aten_calls, (invertible.aten_calls, autograd.aten_calls)
    assert invertible.flops <= 1.40 * autograd.flops, (invertible.flops, autograd.flops)


@pytest.mark.slow
def test_tiled_step_work(autograd):
    tiled = count_step_work(PyramidFlowConfig(mode="invertible", backward_tile=64), SIZE)
    assert tiled.aten_calls <= 2.28 * autograd.aten_calls, (tiled.aten_calls, autograd.aten_calls)
    assert tiled.flops <= 1.71 * autograd.flops, (tiled.flops, autograd.flops)  # [1.50]
