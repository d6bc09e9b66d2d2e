"""The process's place in a distributed job, from the launcher's environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `srun` (one task per GPU, no launcher) sets
only Slurm's variables, which `adopt_slurm_ranks` copies to torch's names (MASTER_ADDR and
MASTER_PORT must then be exported by the job). Alone, a process is rank 0 of 1.
"""

from __future__ import annotations

import os

SLURM_TO_TORCH = {
    "SLURM_PROCID": "RANK",
    "SLURM_NTASKS": "WORLD_SIZE",
    "SLURM_LOCALID": "LOCAL_RANK",
}


def adopt_slurm_ranks() -> None:
    """torch's rank variables from Slurm's, when no launcher set them (plain srun)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        for slurm, torch_name in SLURM_TO_TORCH.items():
            os.environ[torch_name] = os.environ[slurm]


def launched_rank() -> int:
    """This process's global rank as the launcher (or Slurm) numbers it; 0 alone."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launched_world_size() -> int:
    """How many processes the launcher (or Slurm) started; 1 alone."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def free_port() -> int:
    """A TCP port no one listens on now: the rendezvous of a process that runs alone, so that
    two such processes on one machine do not both claim the default 29500."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
