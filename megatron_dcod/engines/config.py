"""Configuration of the DeepSpeed engine (`python -m megatron_dcod.train_hf`).

Built once from the command line (`engines/arguments.py`) and passed explicitly. The correction
and the trace data are the Megatron engine's own dataclasses (`megatron_dcod/config.py`); these
hold what only this engine has, under Megatron's names where Megatron has the concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_dcod.config import CorrectionConfig, TraceDataConfig

ZERO_STAGES = (0, 1, 2, 3)
OPTIMIZERS = ("adam", "sgd")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass(frozen=True)
class DataSourceConfig:
    """Which trace datasets, blended and split as Megatron's `--data-path` and `--split`."""

    data_path: tuple[str, ...] = ()
    """Dataset prefixes, optionally weighted: ("0.7", "a", "0.3", "b")."""
    train_data_path: tuple[str, ...] | None = None
    valid_data_path: tuple[str, ...] | None = None
    test_data_path: tuple[str, ...] | None = None
    split: str | None = None
    """Train/valid/test shares of each dataset's traces ("98,2,0")."""
    data_cache_path: str | None = None
    """Where the sample index of each dataset is cached (None: rebuilt every run)."""
    num_workers: int = 2
    """Data-loader worker processes per rank."""


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its schedule: Megatron's flags and Megatron's scheduler."""

    optimizer: str = "adam"
    """adam (AdamW, decoupled weight decay, as Megatron's) or sgd."""
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: int | None = None
    """Iterations of the decay (None: --train-iters)."""
    lr_warmup_fraction: float | None = None
    """Warm-up as a fraction of the decay iterations (wins over lr_warmup_iters)."""
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    """Learning rate at the first warm-up step."""
    weight_decay: float = 0.01
    """Applied to matrices only; biases and norm weights get none (as in Megatron)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0: none)."""


@dataclass(frozen=True)
class DeepSpeedOptions:
    """How DeepSpeed holds the model: ZeRO stage, offload, precision, overrides."""

    zero_stage: int = 2
    offload_optimizer: str | None = None
    """"cpu": optimizer states and step on the host (ZeRO 1–3)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass."""
    bf16: bool = False
    """bf16 weights and activations, fp32 master weights and optimizer state."""
    config_file: str | None = None
    """A DeepSpeed JSON config whose entries override the generated ones."""
    logits_chunk_tokens: int = 2048
    """Tokens per chunk of the output layer and log-softmax: one chunk's full-vocabulary logits
    live at a time, recomputed in the backward pass."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Batches, iterations and intervals."""

    micro_batch_size: int = 1
    global_batch_size: int | None = None
    """Sequences per optimizer step (None: micro batch × data-parallel size)."""
    train_iters: int = 1
    seed: int = 1234
    log_interval: int = 100
    eval_interval: int | None = None
    """Evaluate on the validation split every this many iterations (None: never)."""
    eval_iters: int = 100
    """Global batches of the validation split per evaluation (0: no evaluation)."""
    exit_interval: int | None = None
    """Stop (saving a checkpoint) after an iteration divisible by this (Megatron's flag)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """DeepSpeed checkpoints (resume) and Hugging Face exports (evaluation, hand-off)."""

    save: str | None = None
    load: str | None = None
    """Resume from the newest checkpoint here (none there: start from --hf-model)."""
    save_interval: int | None = None
    save_hf: str | None = None
    """HF dir of the final weights (None: {save}/hf)."""
    save_hf_interval: int | None = None
    """Also export every this many iterations, to {save_hf}_iter_NNNNNNN."""
    tensorboard_dir: str | None = None
    exit_signal_handler: bool = False
    """On SIGTERM, finish the step, save a checkpoint and exit (Slurm's requeue)."""

    @property
    def hf_dir(self) -> Path | None:
        if self.save_hf:
            return Path(self.save_hf)
        return Path(self.save, "hf") if self.save else None


@dataclass(frozen=True)
class HFTrainConfig:
    """Everything a DeepSpeed-engine run needs, resolved from its flags once."""

    hf_model: str
    """HF model dir: config, weights, tokenizer (the student at step 0)."""
    data: TraceDataConfig
    sources: DataSourceConfig
    correction: CorrectionConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
