"""The DeepSpeed engine's log lines, in the Megatron engine's format and names.

Every `--log-interval` steps rank 0 prints one line

    iteration  N/ TOTAL | consumed samples: ... | elapsed time per iteration (ms): ... |
    tokens/s: ... | learning rate: ... | global batch size: ... | lm loss: ... |
    base loss: ... | grad norm: ... |

(the losses and the grad norm are the interval's means of each step's value, as Megatron
averages them), preceded by the weight line of `training.metrics.WeightMetrics`; validation
prints `validation loss at iteration N | lm loss value: ... | lm loss PPL: ... | base loss
value: ... |` (base loss: the unweighted token loss). Lines are
flushed one by one; there is no progress bar, so logs under a launcher stay clean. With
--tensorboard-dir the same values go to TensorBoard under Megatron's tags.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

TENSORBOARD_TAGS = {"grad norm": "grad-norm"}
"""Megatron's TensorBoard tag where it differs from the log line's name."""


@dataclass
class IntervalLog:
    """Accumulates the steps of one log interval and prints them (rank 0)."""

    train_iters: int
    global_batch_size: int
    seq_length: int
    is_reporting_rank: bool
    tensorboard: Any = None
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, lm_loss: float, base_loss: float, grad_norm: float | None) -> None:
        self.steps += 1
        values = {"lm loss": lm_loss, "base loss": base_loss}
        if grad_norm is not None:
            values["grad norm"] = grad_norm
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def report(self, iteration: int, learning_rate: float) -> dict[str, float]:
        """Print the interval's line and start the next interval; returns its values."""
        elapsed = time.perf_counter() - self.started
        steps = max(self.steps, 1)
        means = {name: total / steps for name, total in self.sums.items()}
        tokens_per_s = steps * self.global_batch_size * self.seq_length / max(elapsed, 1e-9)
        if self.is_reporting_rank:
            fields = [
                f"iteration {iteration:8d}/{self.train_iters:8d}",
                f"consumed samples: {iteration * self.global_batch_size:12d}",
                f"elapsed time per iteration (ms): {1000 * elapsed / steps:.1f}",
                f"tokens/s: {tokens_per_s:.1f}",
                f"learning rate: {learning_rate:.6E}",
                f"global batch size: {self.global_batch_size:5d}",
                *(f"{name}: {value:.6E}" for name, value in means.items()),
            ]
            print(" " + " | ".join(fields) + " |", flush=True)
            self._write_tensorboard(iteration, means, learning_rate, tokens_per_s)
        self.steps, self.sums, self.started = 0, {}, time.perf_counter()
        return means

    def _write_tensorboard(self, iteration, means, learning_rate, tokens_per_s) -> None:
        if self.tensorboard is None:
            return
        scalars = {"learning-rate": learning_rate, "tokens-per-second": tokens_per_s}
        scalars |= {TENSORBOARD_TAGS.get(name, name): value for name, value in means.items()}
        for name, value in scalars.items():
            self.tensorboard.add_scalar(name, value, iteration)
        self.tensorboard.flush()

    def validation(self, iteration: int, lm_loss: float, base_loss: float) -> None:
        """`base loss value` is the unweighted token loss, comparable between weightings."""
        if not self.is_reporting_rank:
            return
        perplexity = math.exp(min(20.0, lm_loss))
        print(
            f" validation loss at iteration {iteration} | lm loss value: {lm_loss:.6E} | "
            f"lm loss PPL: {perplexity:.6E} | base loss value: {base_loss:.6E} |",
            flush=True,
        )
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("lm loss validation", lm_loss, iteration)
            self.tensorboard.add_scalar("lm loss validation ppl", perplexity, iteration)
            self.tensorboard.add_scalar("base loss validation", base_loss, iteration)
