"""The loss function Megatron calls: its contract, NaN handling and weight metrics."""

import pytest
import torch

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction.loss import STAT_NAMES
from megatron_dcod.training.metrics import WeightMetrics
from megatron_dcod.training.step import ForwardStep


def batch():
    generator = torch.Generator().manual_seed(0)
    return {
        "tokens": torch.randint(0, 16, (2, 4), generator=generator),
        "labels": torch.randint(0, 16, (2, 4), generator=generator),
        "loss_mask": torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1.0]]),
        "segment_ids": torch.tensor([[0, 0, 0, 0], [5, 5, 5, 5]]),
        "teacher_logprobs": -torch.rand(2, 4, generator=generator),
    }


def test_loss_contract_and_metrics():
    metrics = WeightMetrics(log_interval=2, num_microbatches=lambda: 2, next_iteration=lambda: 2)
    step = ForwardStep(CorrectionConfig(weighting="dcod"), pack=True, metrics=metrics)
    token_ce = torch.rand(1, 8, requires_grad=True)  # packed output: one row of b·s
    loss, num_tokens, report = step.loss(batch(), True, token_ce)
    assert num_tokens.item() == 5 and num_tokens.dtype == torch.int
    assert report["lm loss"][1] == 5 and report["base loss"][1] == 5
    mask = batch()["loss_mask"].view(1, 8)
    assert report["base loss"][0].item() == pytest.approx((token_ce * mask).sum().item())
    loss.backward()
    assert metrics.last_report is None  # one of two micro-batches
    step.loss(batch(), True, token_ce.detach())
    summary = metrics.last_report
    assert summary is not None and 0 < summary["w mean"] < 2 and summary["w ess"] <= 1
    assert metrics.sums.abs().sum() == 0 and len(metrics.sums) == len(STAT_NAMES)


def test_non_finite_loss_is_dropped_and_reported():
    metrics = WeightMetrics(log_interval=1, num_microbatches=lambda: 1, next_iteration=lambda: 1)
    step = ForwardStep(CorrectionConfig(), pack=False, metrics=metrics)
    token_ce = torch.rand(2, 4, requires_grad=True)
    poisoned = token_ce * torch.tensor([1.0, float("nan")]).repeat(4).view(2, 4)
    loss, num_tokens, report = step.loss(batch(), True, poisoned)
    assert loss.item() == 0 and num_tokens.item() == 0
    assert torch.isnan(report["lm loss"][0])  # Megatron counts a NaN iteration
    loss.backward()
    assert token_ce.grad is None  # nothing reaches the model from this micro-batch
    assert metrics.last_report["w mean"] == 0  # the step's stats exclude it


def test_weights_normalization_hands_the_weight_sum_to_megatron():
    received = []

    class ModelConfig:
        finalize_model_grads_func = staticmethod(
            lambda model, num_tokens: received.append(num_tokens)
        )

    step = ForwardStep(CorrectionConfig(weighting="dcod", normalization="weights"), pack=False)
    step.weight_sum.install(ModelConfig)
    total = 0.0
    for _ in range(2):
        _, _, report = step.loss(batch(), True, torch.rand(2, 4))
        total += report["lm loss"][1].item()
    ModelConfig.finalize_model_grads_func([], torch.tensor(5, dtype=torch.int))
    assert received[0].item() == pytest.approx(total) and received[0].dtype == torch.float32
    assert step.weight_sum.total.item() == 0  # reset for the next step
