"""The CLI ↔ config bridge of the training flags."""

import argparse
import dataclasses

import pytest

from megatron_dcod.arguments import (
    add_dcod_args,
    correction_config_from_args,
    trace_data_config_from_args,
)
from megatron_dcod.config import CorrectionConfig, TraceDataConfig

NON_DEFAULT = CorrectionConfig(
    weighting="dcod",
    base_loss="todi",
    scope="prefix",
    temperature=0.5,
    offset=-1.5,
    scale=3.0,
    clip_min=0.1,
    clip_max=2.5,
    normalization="weights",
    topk_mode="tail",
    todi_beta=0.25,
    iw_sft_max_weight=4.0,
    train_sources=("teacher", "inserted"),
)


def parse(*flags: str) -> argparse.Namespace:
    parser = add_dcod_args(argparse.ArgumentParser())
    return parser.parse_args(["--hf-config=hf", *flags])


def flag_of(field: str) -> str:
    return f"--dcod-{field.replace('_', '-')}"


def flag_value(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def test_every_field_has_a_flag_and_reaches_the_config():
    flags = [
        f"{flag_of(f.name)}={flag_value(getattr(NON_DEFAULT, f.name))}"
        for f in dataclasses.fields(NON_DEFAULT)
    ]
    assert correction_config_from_args(parse(*flags)) == NON_DEFAULT
    assert all(getattr(NON_DEFAULT, f.name) != f.default for f in dataclasses.fields(NON_DEFAULT))


def test_defaults_are_the_config_defaults():
    args = parse()
    assert correction_config_from_args(args) == CorrectionConfig()
    args.seq_length = 64
    data = trace_data_config_from_args(args, NON_DEFAULT)
    assert data == TraceDataConfig(64, pack=True, arrays=NON_DEFAULT.required_arrays())
    args.dcod_no_pack, args.dcod_tokenizer = True, "tok"
    assert trace_data_config_from_args(args, CorrectionConfig()) == TraceDataConfig(
        64, pack=False, arrays=(), tokenizer="tok"
    )


def test_bad_values_are_refused():
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        parse("--dcod-topk-mode=renormalise")
    with pytest.raises(ValueError, match="temperature must be positive"):
        correction_config_from_args(parse("--dcod-temperature=0"))
    for bad in ("oracle", "teacher,oracle", ","):
        with pytest.raises(SystemExit):
            parse(f"--dcod-train-sources={bad}")


def test_train_sources_flag():
    config = correction_config_from_args(parse("--dcod-train-sources= inserted,student"))
    assert config.train_sources == ("student", "inserted") and config.restricts_sources
    assert config.required_arrays() == ("source",)
    everything = parse("--dcod-train-sources=teacher,student,inserted")
    assert not correction_config_from_args(everything).restricts_sources
