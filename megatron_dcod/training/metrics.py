"""Weight diagnostics every log interval: mean/std of w, ESS, w<0.1, mean Δ, dropped batches.

The loss function adds each training micro-batch's sums (`correction.objective.STAT_NAMES`);
after the last micro-batch of a logged iteration the sums are all-reduced over the data-parallel
group of the last pipeline stage, which holds every token of the interval, and written to
stdout in Megatron's `key: value |` format, to TensorBoard (`dcod/<name>`) and to W&B when
configured. Micro-batches dropped for a non-finite loss are counted here
(`dropped_microbatches`, `dropped_tokens`), not in Megatron's `lm loss`. When the run loads the
`source` array, the line also holds `base loss <source>` and `w mean <source>` for the student,
teacher and inserted tokens (means of the interval's sums, like the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import logging

import torch

from megatron_dcod.correction.objective import STAT_NAMES, summarize_stats

logger = logging.getLogger(__name__)


@dataclass
class WeightMetrics:
    """Accumulates weight statistics over a log interval and reports them."""

    log_interval: int
    """Report every this many iterations (Megatron's --log-interval)."""
    num_microbatches: Callable[[], int]
    """Micro-batches per iteration on this rank (Megatron's calculator; it may ramp up)."""
    next_iteration: Callable[[], int]
    """The 1-based number of the iteration being computed."""
    writers: Callable[[], tuple[Any, Any]] = lambda: (None, None)
    """(TensorBoard writer, W&B module) of this rank, either may be None."""
    data_parallel_group: Callable[[], Any] = lambda: None
    """Process group to reduce over (None: the default group)."""
    is_reporting_rank: bool = False
    """Whether this rank prints the line (Megatron prints from the last rank)."""
    per_source: bool = False
    """Report the per-source means too (the batches carry the `source` array)."""
    sums: torch.Tensor = field(
        default_factory=lambda: torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    )
    microbatches_seen: int = 0
    last_report: dict[str, float] | None = None

    def add(self, stats: torch.Tensor) -> None:
        """Add one training micro-batch; report when it closes a logged iteration."""
        self.sums = self.sums.to(stats.device) + stats
        self.microbatches_seen += 1
        if self.microbatches_seen < self.num_microbatches():
            return
        self.microbatches_seen = 0
        iteration = self.next_iteration()
        if iteration % self.log_interval == 0:
            self.report(iteration)

    def report(self, iteration: int) -> dict[str, float]:
        sums = self.sums.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, group=self.data_parallel_group())
        self.sums.zero_()
        summary = summarize_stats(sums, self.per_source)
        self.last_report = summary
        if self.is_reporting_rank:
            fields = " | ".join(f"{name}: {_format(value)}" for name, value in summary.items())
            print(f" iteration {iteration:8d} | dcod weights | {fields} |", flush=True)
            if summary["dropped_microbatches"]:
                logger.warning(
                    "iterations up to %d: %d micro-batches (%d supervised tokens) with a "
                    "non-finite loss were dropped",
                    iteration, summary["dropped_microbatches"], summary["dropped_tokens"],
                )  # fmt: skip
            tensorboard, wandb = self.writers()
            for name, value in summary.items():
                if tensorboard is not None:
                    tensorboard.add_scalar(f"dcod/{name}", value, iteration)
            if wandb is not None:
                wandb.log({f"dcod/{name}": value for name, value in summary.items()}, iteration)
        return summary


def _format(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6E}"
