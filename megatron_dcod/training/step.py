"""Megatron's forward-step extension point: batch → model → corrected loss (DESIGN.md §5)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction.loss import corrected_loss
from megatron_dcod.training.batch import next_batch, packed_seq_params
from megatron_dcod.training.metrics import WeightMetrics

logger = logging.getLogger(__name__)


@dataclass
class WeightSumNormalizer:
    """Global Σ m·w of a step for `--dcod-normalization weights`.

    Megatron's schedules add up integer token counts and hand the total to
    `config.finalize_model_grads_func`, which all-reduces it and scales the gradients by its
    inverse. This wrapper of that hook hands over the step's weight sum instead.
    """

    total: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    wrapped: bool = False

    def install(self, model_config: Any) -> None:
        original = model_config.finalize_model_grads_func

        def finalize_with_weight_sum(model, num_tokens, *args, **kwargs):
            weight_sum = self.total.to(num_tokens.device) if num_tokens is not None else None
            self.total = torch.zeros_like(self.total)
            return original(model, weight_sum, *args, **kwargs)

        model_config.finalize_model_grads_func = finalize_with_weight_sum
        self.wrapped = True


@dataclass
class ForwardStep:
    """`forward_step(data_iterator, model)` for `megatron.training.pretrain`."""

    correction: CorrectionConfig
    """The weighting and base loss."""
    pack: bool
    """Batches hold packed traces (THD attention) rather than one trace per row."""
    metrics: WeightMetrics | None = None
    """Where training micro-batches report their weight statistics."""
    weight_sum: WeightSumNormalizer = field(default_factory=WeightSumNormalizer)

    def __call__(self, data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next_batch(data_iterator, torch.device("cuda"))
        labels = batch["labels"] if self.correction.base_loss == "ce" else None  # → per-token CE
        if self.pack:  # one row of b·s tokens, attention kept inside each trace
            output = model(
                batch["tokens"].view(1, -1),
                batch["position_ids"].view(1, -1),
                None,
                labels=None if labels is None else labels.view(1, -1),
                packed_seq_params=packed_seq_params(batch["segment_ids"]),
            )
        else:
            output = model(batch["tokens"], batch["position_ids"], None, labels=labels)
        if self.correction.normalization == "weights" and not self.weight_sum.wrapped:
            from megatron.core.utils import get_model_config

            self.weight_sum.install(get_model_config(model))
        return output, partial(self.loss, batch, model.training)

    def loss(self, batch: dict[str, torch.Tensor], training: bool, output: torch.Tensor):
        """Megatron's loss contract: (summed loss, token count, {name: [sum, count]})."""
        rows, seq = batch["tokens"].shape
        output = output.view(rows, seq, *output.shape[2:])  # [b, s] CE or [b, s, v/tp] logits
        result = corrected_loss(self.correction, output, batch)
        supervised = batch["loss_mask"].sum()  # [] tokens with a target
        finite = bool(torch.isfinite(result.loss_sum))
        if training and self.metrics is not None:  # every micro-batch counts towards the step
            self.metrics.add(result.stats if finite else torch.zeros_like(result.stats))
        if not finite:
            return self._dropped(result.loss_sum, batch)
        if training and self.correction.normalization == "weights":
            self.weight_sum.total = self.weight_sum.total.to(result.normalizer.device)
            self.weight_sum.total += result.normalizer.float()
        report = {
            "lm loss": torch.stack([result.loss_sum.detach().float(), result.normalizer.float()]),
            "base loss": torch.stack([result.base_loss_sum.float(), supervised.float()]),  # ℓ
        }
        return result.loss_sum, supervised.to(torch.int), report

    def _dropped(self, loss_sum: torch.Tensor, batch: dict[str, torch.Tensor]):
        """A non-finite micro-batch loss: log it, contribute nothing, and let Megatron count it.

        The returned loss is a detached zero (no gradient reaches the model from this micro-
        batch); the NaN in the report makes Megatron log the iteration as a NaN iteration.
        """
        traces = int(torch.unique(batch["segment_ids"]).numel())
        logger.warning(
            "non-finite loss %s in a micro-batch of %d traces: skipped", loss_sum, traces
        )
        zero = torch.zeros((), device=loss_sum.device, requires_grad=True)
        nan = torch.tensor([float("nan"), 1.0], device=loss_sum.device)
        report = {"lm loss": nan, "base loss": nan}
        return zero, torch.zeros((), dtype=torch.int, device=loss_sum.device), report
