"""What `python -m megatron_dcod.train_hf` refuses before DeepSpeed starts, its dry run, and the
DeepSpeed config it generates from the flags."""

import json

import numpy as np
import pytest
import torch

from megatron_dcod.data.trace_format import Trace, TraceDatasetWriter
from megatron_dcod.engines.arguments import parse_config
from megatron_dcod.engines.deepspeed_setup import batch_geometry, deepspeed_config
from megatron_dcod.train_hf import main
from tests.helpers.models import save_tiny_student, tokenizer_fingerprint
from tests.helpers.traces import write_synthetic_traces


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("student"))


def flags(model, data, *extra) -> list[str]:
    return [
        f"--hf-model={model}", f"--data-path={data}", "--split=100,0,0", "--seq-length=32",
        "--micro-batch-size=1", "--train-iters=1", "--lr=1e-3", *extra,
    ]  # fmt: skip


def refusal(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert not torch.distributed.is_initialized()  # refused before any process group
    return str(exit_info.value)


def test_a_dataset_of_another_tokenizer_is_refused_naming_it(student, tmp_path):
    other = write_synthetic_traces(tmp_path / "other", count=4, vocab=64)  # synthetic tokenizer
    message = refusal(flags(student, other))
    assert str(other) in message and "tokenizer" in message


def test_a_dataset_without_the_correction_s_arrays_is_refused(student, tmp_path):
    prefix = tmp_path / "plain"
    with TraceDatasetWriter(prefix, ("tokens", "loss_mask")) as writer:
        for length in (5, 9):
            tokens = np.arange(length, dtype=np.int32)
            loss_mask = np.ones(length, np.uint8)
            loss_mask[0] = 0  # the first token has nothing to be predicted from
            writer.add(Trace(tokens=tokens, loss_mask=loss_mask))
        writer.commit({"tokenizer": tokenizer_fingerprint(student)})
    message = refusal(flags(student, prefix, "--dcod-weighting=dcod"))
    assert "teacher_logprobs" in message and str(prefix) in message
    message = refusal(flags(student, prefix, "--dcod-base-loss=kl"))
    assert "teacher_topk_ids" in message


def test_a_model_dir_without_a_tokenizer_is_refused(tmp_path):
    from tests.helpers.models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "bare", vocab_size=64)
    data = write_synthetic_traces(tmp_path / "traces", count=4, vocab=64)
    assert "no usable tokenizer" in refusal(flags(model, data))


def test_the_dry_run_checks_the_batch_geometry_for_the_world_size(student, capsys):
    argv = flags(student, "unused", "--global-batch-size=32", "--zero-stage=3", "--bf16")
    main([*argv, "--dcod-dry-run=16"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("flags OK for 16 processes: ZeRO-3 over DP 16")
    assert "global batch 32 = micro 1 × DP 16 × 2 accumulation steps" in line
    with pytest.raises(SystemExit, match="not a multiple"):
        main([*flags(student, "unused", "--global-batch-size=24"), "--dcod-dry-run=16"])


def test_deepspeed_config_takes_file_overrides_but_not_the_batch_or_optimizer(tmp_path):
    config = parse_config(flags("m", "d", "--zero-stage=3", "--offload-optimizer=cpu"))
    generated = deepspeed_config(config.deepspeed, config.optimizer, 2, 4, 8)
    assert generated["train_batch_size"] == 64 and generated["gradient_accumulation_steps"] == 4
    assert generated["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    overrides = tmp_path / "ds.json"
    overrides.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 7}}))
    config = parse_config(flags("m", "d", "--zero-stage=3", f"--deepspeed-config={overrides}"))
    merged = deepspeed_config(config.deepspeed, config.optimizer, 1, 1, 1)["zero_optimization"]
    assert merged["stage"] == 3 and merged["stage3_prefetch_bucket_size"] == 7
    overrides.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        deepspeed_config(config.deepspeed, config.optimizer, 1, 1, 1)


def test_batch_geometry_follows_megatron_s_rule():
    config = parse_config(flags("m", "d", "--global-batch-size=12", "--micro-batch-size=2"))
    assert batch_geometry(config.schedule, 3) == (12, 2)
    assert batch_geometry(parse_config(flags("m", "d")).schedule, 4) == (4, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        batch_geometry(config.schedule, 4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--optimizer=sgd", "--offload-optimizer=cpu", "--zero-stage=2"],
            "needs --optimizer adam",
        ),
        (["--bf16", "--zero-stage=0"], "--bf16 needs --zero-stage 1, 2 or 3"),
        (["--offload-optimizer=cpu", "--zero-stage=0"], "needs --zero-stage 1, 2 or 3"),
        (["--save-hf=m"], "must not be --hf-model"),
    ],
)
def test_flag_combinations_deepspeed_would_get_wrong_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(flags("m", "d", *extra))
    assert message in capsys.readouterr().err


def test_mixture_of_experts_and_converted_families_are_refused(tmp_path):
    from transformers import MixtralConfig

    from megatron_dcod.engines.preflight import check_architecture

    config = MixtralConfig(num_local_experts=4)
    with pytest.raises(ValueError, match="mixture-of-experts model \\(4 experts\\)"):
        check_architecture(config, str(tmp_path))
    with pytest.raises(ValueError, match="converted as they load"):  # fused experts on load
        check_architecture(MixtralConfig(num_local_experts=1), str(tmp_path))
