"""Train a Hugging Face causal LM with DeepSpeed: `python -m megatron_dcod.train_hf`.

The second training engine (README, "Training with DeepSpeed"): any `AutoModelForCausalLM` dir,
the trace datasets of tools/preprocess_traces.py read exactly as the Megatron engine reads them,
the same corrections (`--dcod-*`), ZeRO 0–3, and HF checkpoints out. Launch it with
`deepspeed`, `torchrun` or `srun`, or alone for one process. The code is under
`megatron_dcod/engines/`.
"""

from __future__ import annotations

import sys

from megatron_dcod.arguments import requested_dry_run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from megatron_dcod.engines.arguments import parse_config
    from megatron_dcod.megatron import patches

    patches.apply(patches.IMPORTS)  # Megatron's datasets, sampler and scheduler; not its devices

    config = parse_config(argv)
    world_size = requested_dry_run(argv)
    try:
        if world_size is not None:
            from megatron_dcod.engines.preflight import dry_run

            print(dry_run(config, world_size), flush=True)
            return
        from megatron_dcod.training.run_guard import start_parent_watchdog

        start_parent_watchdog()  # a worker whose launcher died exits
        quiet_libraries()
        run(config)
    except ValueError as error:  # the model dir, a dataset, a --dcod-* or DeepSpeed setting
        raise SystemExit(f"error: {error}") from None


def quiet_libraries() -> None:
    """Logs of this engine's lines, not its libraries' chatter: megatron.training sets the root
    logger to INFO when imported (every dataset array's index would be logged), and DeepSpeed
    calls collectives torch deprecates, once per step."""
    import logging
    import warnings

    import megatron.training.utils  # noqa: F401 (configures logging as it imports)

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("megatron_dcod").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def run(config) -> None:
    """Train; the process group this call created is destroyed at the end, even on an error."""
    import torch

    from megatron_dcod.engines.loop import train

    owns_group = not torch.distributed.is_initialized()
    try:
        train(config)
    finally:
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
