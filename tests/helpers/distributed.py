"""run_distributed_test: run a function on N CPU processes joined by a gloo process group."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, kwargs, errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        from megatron_dcod.megatron import patches

        patches.apply(patches.LIBRARY)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        fn(**kwargs)
    except BaseException:  # report any failure, assertion or error, to the parent
        errors.put((rank, traceback.format_exc()))
        sys.exit(1)  # the parent re-raises with the traceback; do not print it twice
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed_test(
    fn: Callable[..., Any], world_size: int = 2, backend: str = "gloo", **kwargs: Any
) -> None:
    """Run `fn(**kwargs)` on `world_size` ranks; fail with the first failing rank's traceback.

    `fn` must be a module-level function (processes are spawned). A rank that hangs fails the
    test after TIMEOUT_S instead of hanging the suite.
    """
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, backend, fn, kwargs, errors))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(TIMEOUT_S)
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    if not errors.empty():
        rank, trace = errors.get()
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{trace}")
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {TIMEOUT_S} s")
    failed = [rank for rank, process in enumerate(processes) if process.exitcode != 0]
    assert not failed, f"ranks {failed} exited with codes {[processes[r].exitcode for r in failed]}"
