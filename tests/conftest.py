"""Shared fixtures: seeding, the device, skipping GPU tests without CUDA."""

# Without CUDA, the kernel tests run Triton interpreted on CPU tensors (NOTE [Triton interpreter] in
# pyramidflow/kernels/triton/_compile.py): set before anything in this process imports triton
# (torch.compile tests may import it first). Importing torch does not import triton.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, and CPU runs use few threads (CI has 2 cores)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: training tests run faster and steadier so on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
