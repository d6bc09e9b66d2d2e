"""The student loaded from a Megatron checkpoint on TP × PP gloo ranks; its logits (and greedy
continuations) are written to files for the tests to compare with HF transformers.

- `megatron_outputs`: Megatron initialized as the trainer is, the checkpoint read by
  `megatron.training.checkpointing.load_checkpoint`.
- `layout_logits`: several checkpoints in one run at one TP/PP layout, each student built from
  the trainer's arguments and read by `megatron.core.dist_checkpointing.load`.

Run with `run_distributed_test(fn, world_size=TP * PP, ...)`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _initialize(flags: list[str]):
    from megatron.training.initialize import initialize_megatron

    from megatron_dcod.megatron import argv, patches

    patches.apply(patches.TRAINING)
    args = argv.parse(flags, cpu=True, set_globals=True)
    initialize_megatron(allow_no_cuda=True)
    return args


def _load_model(args):
    from megatron.core.enums import ModelType
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.training import get_model

    from megatron_dcod.training.preflight import TrainingRun, check_flags
    from megatron_dcod.training.providers import model_provider

    hf_config, correction, data = check_flags(args)
    run = TrainingRun(hf_config, correction, data, None, use_transformer_engine=False)
    provider = model_provider(args, run)
    model = get_model(provider, ModelType.encoder_or_decoder, wrap_with_ddp=False)
    load_checkpoint(model, None, None, strict=True)
    for module in model:
        module.eval()
    return model


def _logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """[b, s, padded vocab] float32 logits on the last pipeline stage; None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def forward_step(data_iterator, module):
        batch = next(data_iterator)  # [b, s]
        positions = torch.arange(batch.shape[1]).expand_as(batch)
        output = module(batch, positions, None)  # last stage: [b, s, vocab / TP]
        return output, lambda out, non_loss_data=True: out

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=model,
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(outputs[0]).float()


def megatron_outputs(flags: list[str], tokens: list[list[int]], new_tokens: int, out: str):
    """Writes {"logits": [b, s, V], "greedy": [b, s + new_tokens]} (V = the HF vocabulary)."""
    from megatron.core import parallel_state

    from megatron_dcod.models.student import load_hf_config

    args = _initialize(flags)
    vocab = load_hf_config(args.hf_config).vocab_size
    model = _load_model(args)
    rows = torch.tensor(tokens)
    logits = _logits(model, rows)
    last_stage = parallel_state.get_pipeline_model_parallel_last_rank()
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    for _ in range(new_tokens):
        step = _logits(model, rows)
        following = torch.zeros(rows.shape[0], 1, dtype=rows.dtype)
        if step is not None:
            following = step[:, -1, :vocab].argmax(-1, keepdim=True)
        dist.broadcast(following, src=last_stage, group=pipeline)
        rows = torch.cat([rows, following], dim=1)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": logits[..., :vocab], "greedy": rows}, out)


def layout_logits(cases: dict, tokens: list[list[int]], tp: int, pp: int, out_dir: str):
    """For each `name: (hf_dir, checkpoint_dir, vocab_multiple)`, writes `{out_dir}/{name}.pt`
    with the [b, s, V] logits of the student at TP = tp, PP = pp."""
    from pathlib import Path

    from megatron.core import dist_checkpointing, parallel_state

    from megatron_dcod.checkpoint.megatron_side import megatron_args, resolve_checkpoint_dir
    from megatron_dcod.models.student import load_hf_config, student_from_args

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(0)  # the forward's RNG tracker (no dropout is drawn)
    rows = torch.tensor(tokens)
    for name, (hf_dir, checkpoint, multiple) in cases.items():
        flags = [f"--seq-length={rows.shape[1]}", f"--make-vocab-size-divisible-by={multiple}"]
        args = megatron_args(Path(hf_dir), flags, tp, pp)
        hf_config = load_hf_config(hf_dir)
        model = student_from_args(
            args, hf_config,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            perform_initialization=False,
        )  # fmt: skip
        directory = str(resolve_checkpoint_dir(Path(checkpoint)))
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
        model.load_state_dict(loaded["model"])
        logits = _logits([model.eval()], rows)
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(logits[..., : hf_config.vocab_size], Path(out_dir, f"{name}.pt"))
