"""The DeepSpeed engine's flags: Megatron's names and defaults for every shared concept."""

import argparse

from megatron_dcod.engines.arguments import build_parser

OWN_FLAGS = {
    "--hf-model", "--zero-stage", "--offload-optimizer", "--gradient-checkpointing",
    "--deepspeed-config", "--logits-chunk-tokens", "--save-hf", "--save-hf-interval",
    "--local_rank", "--local-rank", "--help", "-h",
}  # fmt: skip
"""What only this engine has (DeepSpeed's settings, the HF model, HF exports)."""


def megatron_parser() -> argparse.ArgumentParser:
    from megatron_dcod.arguments import add_dcod_args
    from megatron_dcod.megatron import patches

    patches.apply(patches.IMPORTS)  # megatron.training on Python 3.11
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    return add_dcod_args(parser)


def test_every_shared_flag_is_the_megatron_engine_s_with_its_default():
    ours, megatron = build_parser(), megatron_parser()
    theirs = {option: action for action in megatron._actions for option in action.option_strings}
    shared = 0
    for action in ours._actions:
        for option in action.option_strings:
            if option in OWN_FLAGS:
                continue
            assert option in theirs, f"{option}: not a flag of python -m megatron_dcod.train"
            if not action.required and action.default is not None:
                assert action.default == theirs[option].default, option
            shared += 1
    assert shared > 40  # data, optimizer, schedule, checkpoints, every --dcod-* flag
