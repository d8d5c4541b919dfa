"""Runs a test's worker in a group of gloo processes on this machine, as torchrun would start them,
and hands back what rank 0 returned -- the part every DDP test shares, so each test file holds only
what it computes per rank and what it compares against one process."""

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker: Callable[[int], Any], rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = worker(rank)
        if rank == 0:
            torch.save(result, path)
    finally:
        dist.destroy_process_group()


def run_ddp(worker: Callable[[int], Any], tmp_path, world: int, timeout_s: float) -> Any:
    """``worker(rank)`` runs in ``world`` spawned processes inside an initialised gloo group (one
    intra-op thread each); returns rank 0's return value (saved with ``torch.save``).

    ``worker`` must be a module-level function (spawn pickles it by name). Processes still alive
    after ``timeout_s`` are terminated; the test fails unless every process exited with 0.
    """
    path = str(tmp_path / "rank0.pt")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, rank, world, port, path)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join()
    assert [p.exitcode for p in procs] == [0] * world, "a DDP worker failed or timed out"
    return torch.load(path)
