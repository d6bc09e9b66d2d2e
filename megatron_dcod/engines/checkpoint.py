"""Checkpoints of the DeepSpeed engine: DeepSpeed's own for resuming, HF dirs for everything else.

`save`/`load` are DeepSpeed's `save_checkpoint`/`load_checkpoint` (model, optimizer and ZeRO
partitions, one tag per iteration, `latest` naming the newest) with the engine's state in the
client state: iteration, consumed samples, the LR scheduler and the RNG states. Every rank
draws the same random numbers (one seed, as Megatron seeds data-parallel ranks), so rank 0's
RNG states restore all ranks. Data order is a function of the consumed samples alone, so a
resumed run continues bit for bit.

`export_hf` writes an HF model dir (safetensors shards, config with the dtype, tokenizer and
generation config from --hf-model) that `from_pretrained` and tools/eval_math.py read: under
ZeRO-3 each parameter is gathered in turn and streamed to rank 0's writer, so no rank holds the
whole model; the dir appears under its name only once complete.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_dcod.checkpoint.hf_files import (
    PlannedTensor,
    StreamingSafetensorsWriter,
    copy_template,
    plan_shards,
    shard_file_names,
    write_index,
)

LATEST_FILE = "latest"
"""DeepSpeed's file naming the newest tag under a --save dir."""
EXPORT_RECORD = "dcod_export.json"
MAX_SHARD_BYTES = 5 * 10**9


def tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, directory: str, iteration: int, client_state: dict[str, Any]) -> None:
    """DeepSpeed checkpoint `iter_NNNNNNN` (every rank writes its partitions) + `latest`."""
    state = dict(client_state, iteration=iteration, rng=rng_state())
    engine.save_checkpoint(directory, tag=tag(iteration), client_state=state)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # `latest` is written: every rank may read it now


def has_checkpoint(directory: str | None) -> bool:
    """Whether `directory` holds a DeepSpeed checkpoint, as rank 0 sees it (every rank acts on
    rank 0's answer: a rank that looked while rank 0 was still writing `latest` would start
    fresh while the others load)."""
    found = bool(directory) and Path(directory, LATEST_FILE).is_file()
    return bool(broadcast_from_rank0(found))


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def load(engine, directory: str | None) -> dict[str, Any] | None:
    """The client state of the newest checkpoint under `directory` after loading it into the
    engine; None when there is none (a first run: the weights of --hf-model)."""
    if not has_checkpoint(directory):
        return None
    path, client_state = engine.load_checkpoint(directory, load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"{directory}: could not load the checkpoint {LATEST_FILE} names")
    restore_rng_state(client_state["rng"])
    return client_state


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters (a tied one once, under its first name) and persistent buffers."""
    named = list(model.named_parameters())
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                named.append((f"{module_name}.{name}" if module_name else name, buffer))
    return named


def export_hf(causal_lm, template: Path, out: Path, iteration: int, zero3: bool) -> Path:
    """Write the HF dir `out` from every rank's shard of `causal_lm` (see module doc)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    named = _named_tensors(causal_lm)
    plan = [
        PlannedTensor(name, tuple(getattr(t, "ds_shape", t.shape)), t.dtype) for name, t in named
    ]
    shards = plan_shards(plan, MAX_SHARD_BYTES)
    files = shard_file_names(len(shards))
    partial = out.with_name(out.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        writers = iter(StreamingSafetensorsWriter(partial / f, s) for f, s in zip(files, shards))
        writer = next(writers)
    for name, tensor in named:
        with _gathered(tensor, zero3):
            if rank == 0:
                if writer.done:
                    writer.close()
                    writer = next(writers)
                writer.write(name, tensor.detach().cpu())
    if rank == 0:
        writer.close()
        write_index(partial, shards, files)
        copy_template(Path(template), partial, causal_lm.config, plan[0].dtype)
        (partial / EXPORT_RECORD).write_text(json.dumps({"iteration": iteration}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def _gathered(tensor: torch.Tensor, zero3: bool):
    """The whole tensor on every rank inside the block (ZeRO-3 keeps each rank's partition)."""
    if not zero3 or not hasattr(tensor, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)


def exported_iteration(out: Path) -> int | None:
    """The iteration an export dir holds, as rank 0 sees it (None: no complete export)."""
    record = Path(out, EXPORT_RECORD)
    found = json.loads(record.read_text())["iteration"] if record.is_file() else None
    return broadcast_from_rank0(found)
