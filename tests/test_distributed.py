"""Two CPU processes (gloo over loopback) train to the same weights as one process with the same global batch.

Why they should agree: every rank takes batch/2 examples of each global batch (DistributedSampler,
the same permutation a single process uses), PER directions come from a generator seeded by
(seed, step) and so are identical on both ranks, ``per_rows = 0`` makes PER exact, and with equal
shards the mean over each rank's rows averaged over ranks (DDP averages gradients) is the global
mean. What remains is float32 rounding in the order of the all-reduce sums.

Tolerance: weights within atol 1e-6 (they are O(0.1..1); observed differences ~3e-8), metrics within rel 1e-4.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from perdiag import train as training
from perdiag.checkpoints import save_checkpoint
from perdiag.distributed import session
from perdiag.models import DigitsMLP

OPTIONS = dict(per_weight=0.5, epochs=2, batch_size=16, per_rows=0, projections=32, lr=1e-2)


def make_run(folder: Path) -> Path:
    """A tiny MLP checkpoint and 64 train / 32 val examples (64 is a multiple of the global batch)."""
    generator = torch.Generator().manual_seed(0)
    torch.save((torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)), folder / "train.pt")
    torch.save((torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)), folder / "val.pt")
    torch.manual_seed(0)
    model = DigitsMLP(in_features=8, hidden=[16, 16], n_classes=3)
    kwargs = {"in_features": 8, "hidden": [16, 16], "n_classes": 3}
    metadata = {"task": "classification", "sample_data": {"train": "train.pt", "val": "val.pt"}}
    save_checkpoint(folder / "tiny.pt", model, arch="perdiag.models:DigitsMLP", arch_kwargs=kwargs, metadata=metadata)
    return folder / "tiny.pt"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(rank: int, world_size: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    with session("cpu") as context:
        assert context.world_size == world_size and context.rank == rank
        plan = training.plan_run(Path(folder) / "tiny.pt", options=OPTIONS, out=Path(folder) / "ddp.pt")
        result = training.fit(plan, context)
        # Only rank 0 writes the checkpoint.
        assert (result.checkpoint is not None) == (rank == 0)
        torch.save({"state": result.model.state_dict(), "metrics": result.metrics}, Path(folder) / f"rank{rank}.pt")


def test_two_gloo_ranks_match_one_process(tmp_path):
    torch.set_num_threads(1)
    make_run(tmp_path)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    single = training.fit(training.plan_run(tmp_path / "tiny.pt", options=OPTIONS, out=tmp_path / "single.pt"))
    assert (tmp_path / "ddp.pt").exists()
    for rank in range(2):
        ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, tensor in single.model.state_dict().items():
            torch.testing.assert_close(ddp["state"][name], tensor, rtol=0, atol=1e-6)
        for column in ("train_task_loss", "train_reg", "val_loss", "val_sw1"):
            assert ddp["metrics"][column].tolist() == pytest.approx(single.metrics[column].tolist(), rel=1e-4, nan_ok=True)
    # Training moved the weights well beyond the tolerance, so the comparison is not vacuous.
    start = torch.load(tmp_path / "tiny.pt", weights_only=True)["state_dict"]
    assert max(float((single.model.state_dict()[k] - start[k]).abs().max()) for k in start) > 1e-2
