"""Megatron's forward-step extension point: batch → model → corrected loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction.objective import corrected_loss
from megatron_dcod.training.batch import next_batch
from megatron_dcod.training.metrics import WeightMetrics

EMPTY_STEP_COUNT = 1e-30
"""Added to a dropped micro-batch's reported token count: Megatron divides the step's summed
loss by the summed count, and a step whose micro-batches were all dropped then logs 0 instead
of 0/0 = NaN (which would poison the averages of the whole log interval). Far below one token,
it changes no other step's figure."""


@dataclass
class WeightSumNormalizer:
    """The step's global Σ m·w for `--dcod-normalization weights`.

    Megatron's schedules add up the integer token counts the loss function returns and hand the
    total to `config.finalize_model_grads_func`, which all-reduces it and scales the gradients by
    its inverse. `finalize` is installed as that function by the model provider (Megatron keeps
    a builder-installed hook) and hands over the step's weight sum instead of the count.
    """

    finalize_model_grads: Any = None
    """Megatron's finalize function that `finalize` calls (None: megatron-core's own)."""
    total: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))

    def add(self, weight_sum: torch.Tensor) -> None:
        """Add one training micro-batch's Σ m·w (on the device, no synchronization)."""
        self.total = self.total.to(weight_sum.device) + weight_sum.float()

    def finalize(self, model, num_tokens, *args, **kwargs):
        """`finalize_model_grads(model, num_tokens, ...)` with the weight sum as `num_tokens`."""
        if self.finalize_model_grads is None:
            from megatron.core.distributed import finalize_model_grads

            self.finalize_model_grads = finalize_model_grads
        weight_sum = self.total.to(num_tokens.device) if num_tokens is not None else None
        self.total = torch.zeros_like(self.total)
        return self.finalize_model_grads(model, weight_sum, *args, **kwargs)


@dataclass
class ForwardStep:
    """`forward_step(data_iterator, model)` for `megatron.training.pretrain`."""

    correction: CorrectionConfig
    """The weighting and base loss."""
    pack: bool
    """Batches hold packed traces (THD attention) rather than one trace per row."""
    metrics: WeightMetrics | None = None
    """Where training micro-batches report their weight statistics."""
    weight_sum: WeightSumNormalizer | None = None
    """Collects Σ m·w of training micro-batches under `--dcod-normalization weights`."""

    def __call__(self, data_iterator: Iterator[dict], model: torch.nn.Module):
        batch, packed_seq_params = next_batch(data_iterator, torch.device("cuda"), self.pack)
        labels = batch["labels"] if self.correction.base_loss == "ce" else None  # → per-token CE
        if self.pack:  # one row of b·s tokens, attention kept inside each trace
            output = model(
                batch["tokens"].view(1, -1),
                batch["position_ids"].view(1, -1),
                None,
                labels=None if labels is None else labels.view(1, -1),
                packed_seq_params=packed_seq_params,
            )
        else:
            output = model(batch["tokens"], batch["position_ids"], None, labels=labels)
        return output, partial(self.loss, batch, model.training)

    def loss(self, batch: dict[str, torch.Tensor], training: bool, output: torch.Tensor):
        """Megatron's loss contract: (summed loss, token count, {name: [sum, count]}).

        Nothing here waits for the device: a dropped micro-batch (see `corrected_loss`) returns
        a connected zero and a zero count, and is counted in the weight metrics.
        """
        rows, seq = batch["tokens"].shape
        output = output.view(rows, seq, *output.shape[2:])  # [b, s] CE or [b, s, v/tp] logits
        result = corrected_loss(self.correction, output, batch)
        if training and self.metrics is not None:  # every micro-batch counts towards the step
            self.metrics.add(result.stats)
        if training and self.weight_sum is not None:
            self.weight_sum.add(result.normalizer)
        tokens, normalizer = result.supervised_tokens.float(), result.normalizer.float()
        empty = (tokens == 0).float() * EMPTY_STEP_COUNT
        report = {
            "lm loss": torch.stack([result.loss_sum.detach().float(), normalizer + empty]),
            "base loss": torch.stack([result.base_loss_sum.float(), tokens + empty]),  # ℓ
        }
        return result.loss_sum, result.supervised_tokens.to(torch.int), report
