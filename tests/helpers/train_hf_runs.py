"""Several `python -m megatron_dcod.train_hf` runs in one launch: one process group, one
DeepSpeed start-up, the runs one after another (the tests' launches cost seconds each).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.train_hf_runs RUNS.json

RUNS.json maps a run name to its command line; rank 0 prints `=== run NAME ===` before each
run's log (`split_runs` cuts the output there). The process group is this script's, so each
run leaves it up for the next.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers.distributed import free_port
from tests.helpers.training import REPO, TIMEOUT_S

MARKER = re.compile(r"^=== run (\S+) ===$", re.MULTILINE)


def main(runs_file: str) -> None:
    import torch.distributed as dist

    from megatron_dcod.engines.deepspeed_setup import init_distributed
    from megatron_dcod.train_hf import main as train_hf

    init_distributed()
    for name, argv in json.loads(Path(runs_file).read_text()).items():
        if dist.get_rank() == 0:
            print(f"=== run {name} ===", flush=True)
        train_hf(argv)
        dist.barrier()
    dist.destroy_process_group()


def launch(runs: dict[str, list[str]], workdir: Path, nproc: int = 1) -> dict[str, str]:
    """{run name: its log} of the runs, launched under torchrun with `nproc` processes."""
    runs_file = Path(workdir, f"runs-{len(list(Path(workdir).glob('runs-*')))}.json")
    runs_file.write_text(json.dumps(runs))
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", "-m", "tests.helpers.train_hf_runs", str(runs_file),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"train_hf runs failed ({result.returncode}):\n{output[-6000:]}")
    return split_runs(result.stdout)


def split_runs(output: str) -> dict[str, str]:
    pieces = MARKER.split(output)
    return {pieces[i]: pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}


if __name__ == "__main__":
    main(sys.argv[1])
