"""DistributedDataParallel sees the engine's parameter gradients: 2 gloo processes equal 1 process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pyramidflow import InvertibleSequential

from _blocks import loss_of, perturbed_couplings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, state, x, out_dir, drift="warn"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        seq = _drifting_couplings(drift) if drift == "recompute" else perturbed_couplings(4)
        seq.load_state_dict(state)
        model = DistributedDataParallel(seq)
        shard = x.chunk(world_size)[rank]
        loss_of(*model(shard)).div(shard.shape[0]).backward()
        torch.save([p.grad for p in seq.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
        torch.save(seq.last_recomputed, os.path.join(out_dir, f"recomputed{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    seq = perturbed_couplings(4)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    loss_of(*seq(x)).div(x.shape[0]).backward()
    expected = [p.grad for p in seq.parameters()]

    mp.spawn(_worker, args=(2, _free_port(), seq.state_dict(), x, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        assert len(grads) == len(expected)
        for grad, reference in zip(grads, expected):
            assert grad is not None
            assert torch.allclose(grad, reference, rtol=1e-10, atol=1e-12)


class _ScaledInverse(torch.nn.Module):
    """A volume-preserving block whose inverse is off by a relative 1e-3 on the first rank's share only
    (its first sample is positive there): drift that one rank sees and the other does not."""

    def forward(self, z):
        return z

    def inverse(self, z):
        return z * (1 + 1e-3) if bool(z[0, 0, 0, 0] > 0) else z


def _drifting_couplings(drift):
    seq = perturbed_couplings(4)
    blocks = list(seq.blocks)
    blocks.insert(2, _ScaledInverse())
    return InvertibleSequential(*blocks, drift=drift)


@pytest.mark.slow
def test_recompute_under_ddp_matches_one_process(tmp_path):
    torch.manual_seed(0)
    seq = _drifting_couplings("recompute")
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    x[0, 0, 0, 0], x[2, 0, 0, 0] = 1.0, -1.0  # rank 0's share drifts, rank 1's does not
    seq.mode = "checkpoint"  # exact: what "recompute" must give
    loss_of(*seq(x)).div(x.shape[0]).backward()
    expected = [p.grad for p in seq.parameters()]

    mp.spawn(_worker, args=(2, _free_port(), seq.state_dict(), x, str(tmp_path), "recompute"), nprocs=2, join=True)
    # Both ranks recompute the same blocks (the drift is reduced over ranks before the decision).
    assert torch.load(tmp_path / "recomputed0.pt") == torch.load(tmp_path / "recomputed1.pt") == (2,)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for grad, reference in zip(grads, expected):
            assert torch.allclose(grad, reference, rtol=1e-10, atol=1e-12)
