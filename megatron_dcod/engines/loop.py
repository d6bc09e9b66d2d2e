"""The DeepSpeed engine's run: checks, model, DeepSpeed, resume, steps, checkpoints, exports.

`train(config)` is `python -m megatron_dcod.train_hf` after its command line was parsed. It
runs in every process of the launch (deepspeed, torchrun or srun) and joins the process group
the launcher describes, or makes a one-process group when started alone.
"""

from __future__ import annotations

import logging
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megatron_dcod.engines import checkpoint
from megatron_dcod.engines.config import HFTrainConfig
from megatron_dcod.engines.data import Layout, build_splits, micro_batches
from megatron_dcod.engines.deepspeed_setup import (
    batch_geometry,
    build_optimizer,
    build_scheduler,
    deepspeed_config,
    init_distributed,
)
from megatron_dcod.engines.log import IntervalLog
from megatron_dcod.engines.preflight import HFRun, prepare, write_resolved_config
from megatron_dcod.engines.step import evaluate, train_step

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """The live pieces of a run, built once by `start`."""

    config: HFTrainConfig
    run: HFRun
    engine: Any
    scheduler: Any
    device: torch.device
    global_batch: int
    accumulation: int
    iteration: int = 0
    saved_iteration: int | None = None
    """The iteration of the newest checkpoint (loaded or written) under --save."""
    resumed_iteration: int | None = None
    """The iteration of the checkpoint this run started from (None: from --hf-model)."""
    consumed_samples: int = 0
    """Training sequences read so far over all ranks (the data position)."""
    lock: Any = None
    """Rank 0's lock on --save."""


def seed_everything(seed: int) -> None:
    """One seed on every rank (Megatron seeds data-parallel ranks alike)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(config: HFTrainConfig) -> Session:
    """Checks, process group, the --save lock, the model under DeepSpeed, the scheduler, and
    the newest checkpoint."""
    run = prepare(config)  # before DeepSpeed: a bad dataset fails in seconds
    device = init_distributed()
    world = torch.distributed.get_world_size()
    global_batch, accumulation = batch_geometry(config.schedule, world)
    micro = config.schedule.micro_batch_size
    ds_config = deepspeed_config(
        config.deepspeed, config.optimizer, micro, accumulation, world, gpu=device.type != "cpu"
    )
    lock = agreed_save_lock(config.checkpoint.save)
    if torch.distributed.get_rank() == 0:
        write_resolved_config(config, run, ds_config, world)
    engine, optimizer = _engine(config, run, ds_config, device)
    scheduler = build_scheduler(
        optimizer, config.optimizer, config.schedule.train_iters, global_batch
    )
    session = Session(config, run, engine, scheduler, device, global_batch, accumulation)
    session.lock = lock
    _resume(session)
    return session


def agreed_save_lock(save_dir: str | None):
    """Rank 0's lock on --save (training/run_guard.py); every rank exits if it is refused."""
    from megatron_dcod.training.run_guard import lock_save_dir

    lock, refusal = None, None
    if save_dir and torch.distributed.get_rank() == 0:
        try:
            lock = lock_save_dir(save_dir)
        except SystemExit as error:  # another run holds it
            refusal = str(error)
    refusal = checkpoint.broadcast_from_rank0(refusal)
    if refusal:
        raise SystemExit(refusal)
    return lock


def _engine(config: HFTrainConfig, run: HFRun, ds_config: dict, device: torch.device):
    """(DeepSpeed engine around the PackedStudent, its optimizer), in training mode."""
    import deepspeed

    from megatron_dcod.engines.hf_student import PackedStudent, check_head, load_student

    options = config.deepspeed
    seed_everything(config.schedule.seed)
    dtype = torch.bfloat16 if options.bf16 else torch.float32
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    causal_lm = load_student(config.hf_model, dtype, device, ds_config if zero3 else None)
    if options.gradient_checkpointing:
        causal_lm.gradient_checkpointing_enable({"use_reentrant": False})
    student = PackedStudent(causal_lm, options.logits_chunk_tokens)
    optimizer = build_optimizer(student, config.optimizer, bool(options.offload_optimizer), device)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=student, optimizer=optimizer, config=ds_config
    )
    check_head(engine.module, run.hf_config.vocab_size, device)
    engine.train()  # from_pretrained leaves the model in eval mode
    return engine, optimizer


def _resume(session: Session) -> None:
    """Load the newest checkpoint of --load, if any: weights, optimizer, schedule, position."""
    config = session.config
    resumed = checkpoint.load(session.engine, config.checkpoint.load)
    if resumed is None:
        if config.checkpoint.load:
            _log0(f"no checkpoint in {config.checkpoint.load}: starting from {config.hf_model}")
        return
    session.iteration = session.resumed_iteration = resumed["iteration"]
    session.consumed_samples = resumed["consumed_samples"]
    if config.checkpoint.load == config.checkpoint.save:
        session.saved_iteration = session.iteration
    try:
        session.scheduler.load_state_dict(resumed["scheduler"])
    except AssertionError as error:  # Megatron's scheduler: a schedule flag changed
        raise ValueError(
            f"{config.checkpoint.load}: the learning-rate schedule of the checkpoint differs "
            f"from the flags ({error}); resume with the flags it was saved with"
        ) from None
    _log0(f"resumed from {config.checkpoint.load} at iteration {session.iteration}")


def _log0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f" {message}", flush=True)


def _layout(session: Session) -> Layout:
    return Layout(
        micro_batch_size=session.config.schedule.micro_batch_size,
        data_parallel_rank=torch.distributed.get_rank(),
        data_parallel_size=torch.distributed.get_world_size(),
        num_workers=session.config.sources.num_workers,
        pin_memory=session.device.type == "cuda",
    )


def _on_device(batches: Iterator[dict], device: torch.device, count: int) -> list[dict]:
    from megatron_dcod.training.batch import next_batch

    return [next_batch(batches, device, pack=False)[0] for _ in range(count)]


class StopRequest:
    """SIGTERM (Slurm's time limit, a preemption) asks for a checkpoint after this step."""

    def __init__(self, enabled: bool):
        self.requested = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was signalled (every rank then stops after the same step)."""
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def train(config: HFTrainConfig) -> Session:
    """Train to --train-iters (or to a SIGTERM), saving and exporting as configured."""
    from megatron_dcod.training.metrics import WeightMetrics

    session = start(config)
    rank, schedule = torch.distributed.get_rank(), config.schedule
    train_data, valid_data, _ = build_splits(
        config.sources, session.run.data, schedule, session.global_batch
    )
    layout = _layout(session)
    batches = micro_batches(train_data, session.consumed_samples, layout)
    valid_batches = None
    if valid_data is not None and schedule.eval_iters > 0 and schedule.eval_interval:
        evaluations = session.iteration // schedule.eval_interval
        consumed = evaluations * schedule.eval_iters * session.global_batch
        valid_batches = micro_batches(valid_data, consumed, layout)
    tensorboard = _tensorboard(config) if rank == 0 else None
    log = IntervalLog(schedule.train_iters, session.global_batch, config.data.seq_length,
                      rank == 0, tensorboard)  # fmt: skip
    metrics = WeightMetrics(
        log_interval=schedule.log_interval,
        num_microbatches=lambda: session.accumulation,
        next_iteration=lambda: session.iteration + 1,
        writers=lambda: (tensorboard, None),
        is_reporting_rank=rank == 0,
        per_source="source" in session.run.data.arrays,
    )
    stop = StopRequest(config.checkpoint.exit_signal_handler)
    try:
        while session.iteration < schedule.train_iters:
            step_batches = _on_device(batches, session.device, session.accumulation)
            totals = train_step(session.engine, config.correction, step_batches, metrics)
            session.scheduler.step(increment=session.global_batch)
            session.iteration += 1
            session.consumed_samples += session.global_batch
            log.add(totals.lm_loss, totals.base_loss, _grad_norm(session.engine))
            if session.iteration % schedule.log_interval == 0:
                log.report(session.iteration, _learning_rate(session.engine))
            if valid_batches is not None and session.iteration % schedule.eval_interval == 0:
                _validate(session, valid_batches, log)
            _save_on_schedule(session)
            if config.checkpoint.exit_signal_handler and stop.agreed(session.device):
                _log0(f"SIGTERM: saving at iteration {session.iteration} and exiting")
                break
            if schedule.exit_interval and session.iteration % schedule.exit_interval == 0:
                _log0(f"exiting at iteration {session.iteration} (--exit-interval)")
                break
        _save_at_end(session)
    finally:
        if tensorboard is not None:
            tensorboard.close()
        if session.lock is not None:
            session.lock.release()
    return session


def _validate(session: Session, valid_batches, log: IntervalLog) -> None:
    count = session.config.schedule.eval_iters * session.accumulation
    totals = evaluate(
        session.engine,
        session.config.correction,
        _on_device(valid_batches, session.device, count),
    )
    log.validation(session.iteration, totals.lm_loss, totals.base_loss)


def _save_on_schedule(session: Session) -> None:
    points = session.config.checkpoint
    iteration, done = session.iteration, session.iteration >= session.config.schedule.train_iters
    if points.save and points.save_interval and iteration % points.save_interval == 0 and not done:
        _save(session)
    if points.hf_dir and points.save_hf_interval and iteration % points.save_hf_interval == 0:
        if not done:
            _export(session, Path(f"{points.hf_dir}_iter_{iteration:07d}"))


def _save_at_end(session: Session) -> None:
    points = session.config.checkpoint
    if points.save:
        _save(session)
    if points.hf_dir and session.iteration >= session.config.schedule.train_iters:
        _export(session, points.hf_dir)


def _save(session: Session) -> None:
    if session.saved_iteration == session.iteration:
        return
    state = {
        "scheduler": session.scheduler.state_dict(),
        "consumed_samples": session.consumed_samples,
    }
    checkpoint.save(session.engine, session.config.checkpoint.save, session.iteration, state)
    session.saved_iteration = session.iteration
    _log0(f"saved checkpoint at iteration {session.iteration} to {session.config.checkpoint.save}")


def _export(session: Session, out: Path) -> None:
    resumed_here = session.resumed_iteration == session.iteration
    if resumed_here and checkpoint.exported_iteration(out) == session.iteration:
        return  # a requeued run that had already exported this iteration
    zero3 = session.engine.zero_optimization_stage() == 3
    causal_lm = session.engine.module.causal_lm
    checkpoint.export_hf(causal_lm, Path(session.config.hf_model), out, session.iteration, zero3)
    _log0(f"exported the HF model at iteration {session.iteration} to {out}")


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _learning_rate(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def _tensorboard(config: HFTrainConfig):
    if not config.checkpoint.tensorboard_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=config.checkpoint.tensorboard_dir)
