"""Train the student: `python -m megatron_dcod.train` or `torchrun ... -m megatron_dcod.train`.

Megatron-LM's `pretrain_gpt.py` pattern on `megatron.training.pretrain`: Megatron's flags for
all it has, `--hf-config DIR` for the architecture and `--dcod-*` for the correction. This entry
only wires the pieces: the patches this machine needs (`megatron/patches.py`), one parse of the
command line (`megatron/argv.py`), the checks before step 1 (`training/preflight.py`), the run
guard on `--save` (`training/run_guard.py`) and the providers (`training/providers.py`). The
parsed arguments become the project's configs once (`preflight.prepare`), passed explicitly.
"""

from __future__ import annotations

import sys

from megatron_dcod.arguments import requested_dry_run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    world_size = requested_dry_run(argv)
    if world_size is not None:
        from megatron_dcod.training.preflight import dry_run

        try:
            print(dry_run(argv, world_size), flush=True)
        except ValueError as error:  # --hf-config, --seq-length, --dcod-* values
            raise SystemExit(f"error: {error}") from None
        return
    from megatron_dcod.megatron import argv as megatron_argv
    from megatron_dcod.megatron import patches
    from megatron_dcod.training import run_guard

    run_guard.start_parent_watchdog()  # first: a worker whose launcher died exits
    applied = patches.apply(patches.TRAINING)
    try:
        args = megatron_argv.parse(argv, cpu=applied.cpu, set_globals=True)
    except ValueError as error:  # --hf-config
        raise SystemExit(f"error: {error}") from None
    train(args)


def train(args) -> None:
    """Check the run, guard its `--save` directory, and hand the providers to `pretrain`."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_dcod.training import preflight, providers, run_guard
    from megatron_dcod.training.step import WeightSumNormalizer

    try:
        run = preflight.prepare(args)
    except ValueError as error:  # a bad --hf-config, dataset or --dcod-* value
        raise SystemExit(f"error: {error}") from None
    save_dir_lock = run_guard.lock_save_dir(args.save) if args.rank == 0 and args.save else None
    preflight.write_resolved_config(args, run)
    weight_sum = WeightSumNormalizer() if run.correction.normalization == "weights" else None
    try:
        pretrain(
            pretrain_cfg_container_from_args(args),
            providers.dataset_provider(args, run),
            ModelType.encoder_or_decoder,
            providers.forward_step(args, run, weight_sum),
            model_provider=providers.model_provider(args, run, weight_sum),
        )
    finally:
        if save_dir_lock is not None:
            save_dir_lock.release()


if __name__ == "__main__":
    main()
