"""The RNG state of a training run: every generator a step draws from, captured and restored.

A resumed run continues bit for bit only if the checkpoint holds the state of every random number
generator the run draws from (``NOTE [resume bit for bit]`` in :mod:`pyramidflow.train`): torch's
global CPU RNG (augmentation), the CUDA RNG of the run's device, numpy's and Python's global RNGs.
The state is stored as tensors, ints and floats only, so that checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["capture_rng_state", "fresh_rng_state", "restore_rng_state"]


def capture_rng_state(device: torch.device) -> dict:
    """The state of torch's CPU RNG, ``device``'s CUDA RNG (``None`` off CUDA), numpy's and Python's RNGs."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # numpy's state as tensors and ints, so the checkpoint loads with weights_only=True.
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
    }
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set every generator to ``state`` (from :func:`capture_rng_state`); the CUDA one only on CUDA."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))


def fresh_rng_state(seed: int, step: int, rank: int) -> dict:
    """A deterministic RNG state for a rank whose state the checkpoint lacks (an interrupted DDP run)."""
    torch.manual_seed(seed * 1_000_003 + step * 7919 + rank)
    return capture_rng_state(torch.device("cpu"))
