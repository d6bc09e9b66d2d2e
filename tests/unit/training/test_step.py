"""The loss function Megatron calls: its contract, dropped micro-batches and weight metrics."""

import math

import pytest
import torch

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction.objective import STAT_NAMES, corrected_loss
from megatron_dcod.training.metrics import WeightMetrics
from megatron_dcod.training.step import ForwardStep, WeightSumNormalizer


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
    assert summary["dropped_microbatches"] == 0 and summary["dropped_tokens"] == 0
    assert metrics.sums.abs().sum() == 0 and len(metrics.sums) == len(STAT_NAMES)


@pytest.mark.parametrize("poison", ["loss", "teacher_logprobs"])
def test_non_finite_micro_batch_is_dropped_connected_and_counted(poison, capsys):
    """A NaN in one supervised token's loss (or in its teacher log-prob, hence its weight)
    drops the whole micro-batch: zero loss and count, finite report, a zero but existing
    gradient for every input of the loss, and the drop counted in the dcod line."""
    metrics = WeightMetrics(
        log_interval=1, num_microbatches=lambda: 2, next_iteration=lambda: 1,
        is_reporting_rank=True,
    )  # fmt: skip
    step = ForwardStep(CorrectionConfig(weighting="dcod"), pack=False, metrics=metrics)
    token_ce = torch.rand(2, 4, requires_grad=True)
    poisoned, output = batch(), token_ce * 1.0
    if poison == "loss":
        output = token_ce + torch.tensor([0, 0, 0, float("nan"), 0, 0, 0, 0]).view(2, 4)
    else:
        poisoned["teacher_logprobs"][1, 2] = float("nan")
    loss, num_tokens, report = step.loss(poisoned, True, output)
    assert loss.item() == 0 and num_tokens.item() == 0
    assert all(torch.isfinite(value).all() for value in report.values())
    assert report["lm loss"][0] == 0 and report["lm loss"][1] < 1e-20  # no 0/0 in Megatron
    loss.backward()
    assert token_ce.grad is not None and torch.equal(token_ce.grad, torch.zeros(2, 4))
    clean_loss, clean_tokens, _ = step.loss(batch(), True, torch.rand(2, 4))  # closes the step
    assert clean_tokens.item() == 5 and clean_loss.item() > 0
    summary = metrics.last_report
    assert summary["dropped_microbatches"] == 1 and summary["dropped_tokens"] == 5
    assert "dropped_microbatches: 1 | dropped_tokens: 5 |" in capsys.readouterr().out


def topk_batch(vocab: int = 16, k: int = 3) -> dict:
    """batch() with the teacher's top-k arrays, as the loader delivers them (int32, float16)."""
    generator = torch.Generator().manual_seed(1)
    topk = batch() | {
        "teacher_topk_ids": torch.randint(0, vocab, (2, 4, k), generator=generator).int(),
        "teacher_topk_logprobs": -torch.rand(2, 4, k, generator=generator).half() - 0.1,
        "source": torch.tensor([[0, 1, 3, 2], [0, 0, 2, 2]], dtype=torch.uint8),
    }
    return topk


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "-inf"])
@pytest.mark.parametrize("base_loss", ["kl", "todi"])
def test_a_bad_teacher_topk_value_drops_the_micro_batch_with_a_zero_gradient(base_loss, bad):
    """0 · ∞ would make the masked terms' gradient NaN: the cached values are made finite
    before the losses see them, so the logits get an exactly zero, finite gradient."""
    step = ForwardStep(CorrectionConfig(weighting="dcod", base_loss=base_loss), pack=False)
    poisoned = topk_batch()
    poisoned["teacher_topk_logprobs"][0, 2, 1] = bad  # a supervised position
    logits = torch.randn(2, 4, 16, requires_grad=True)
    loss, num_tokens, report = step.loss(poisoned, True, logits)
    assert loss.item() == 0 and num_tokens.item() == 0
    assert all(torch.isfinite(value).all() for value in report.values())
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


NO_SYNC = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@pytest.mark.parametrize("sources", [("student", "teacher", "inserted"), ("teacher",)])
@pytest.mark.parametrize("base_loss", ["ce", "kl", "todi"])
def test_the_loss_never_synchronizes_with_the_device(monkeypatch, base_loss, sources):
    """No `bool(tensor)`, `float(tensor)`, `.item()`, ... in the loss or the metrics' per-micro-
    batch work: the drop decision, the source restriction and the statistics stay device
    tensors."""

    def refuse(self, *args):
        raise AssertionError("host synchronization in the loss function")

    metrics = WeightMetrics(
        log_interval=1, num_microbatches=lambda: 8, next_iteration=lambda: 1, per_source=True
    )
    config = CorrectionConfig(
        weighting="dcod", scope="prefix", base_loss=base_loss, train_sources=sources
    )
    step = ForwardStep(config, pack=False, metrics=metrics, weight_sum=WeightSumNormalizer())
    output = torch.rand(2, 4) if base_loss == "ce" else torch.randn(2, 4, 16)
    for name in NO_SYNC:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss, num_tokens, report = step.loss(topk_batch(), True, output)
    monkeypatch.undo()
    assert loss.item() > 0 and num_tokens.item() == (5 if len(sources) == 3 else 3)
    assert metrics.microbatches_seen == 1


def test_weights_normalization_hands_the_weight_sum_to_megatron():
    received = []
    weight_sum = WeightSumNormalizer(
        finalize_model_grads=lambda model, num_tokens: received.append(num_tokens)
    )
    step = ForwardStep(
        CorrectionConfig(weighting="dcod", normalization="weights"), pack=False,
        weight_sum=weight_sum,
    )  # fmt: skip
    total = 0.0
    for _ in range(2):
        _, _, report = step.loss(batch(), True, torch.rand(2, 4))
        total += report["lm loss"][1].item()
    step.loss(batch(), False, torch.rand(2, 4))  # validation does not count
    weight_sum.finalize([], torch.tensor(5, dtype=torch.int))
    assert received[0].item() == pytest.approx(total) and received[0].dtype == torch.float32
    assert weight_sum.total.item() == 0  # reset for the next step


def test_per_source_metrics_are_reduced_as_sums_over_micro_batches_and_ranks(monkeypatch):
    """Two micro-batches here and two on a simulated second data-parallel rank (its sums added
    by the all-reduce): the per-source means are those of all their tokens pooled, in float64,
    not means of per-micro-batch means (the sources are spread unevenly)."""
    generator = torch.Generator().manual_seed(7)
    sources = [[[0, 1, 1, 1], [0, 0, 3, 2]], [[0, 2, 2, 2], [0, 0, 1, 2]]]
    micro_batches = []
    for index in range(4):
        micro_batch = batch() | {
            "teacher_logprobs": -torch.rand(2, 4, generator=generator, dtype=torch.float64),
            "source": torch.tensor(sources[index % 2], dtype=torch.uint8),
        }
        micro_batches.append((micro_batch, torch.rand(2, 4, generator=generator).double()))
    config = CorrectionConfig(weighting="dcod", temperature=0.5)
    other_rank = sum(corrected_loss(config, ce, b).stats for b, ce in micro_batches[2:])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda sums, group: sums.add_(other_rank))
    metrics = WeightMetrics(
        log_interval=1, num_microbatches=lambda: 2, next_iteration=lambda: 1, per_source=True
    )
    step = ForwardStep(config, pack=False, metrics=metrics)
    for micro_batch, ce in micro_batches[:2]:
        step.loss(micro_batch, True, ce)
    summary = metrics.last_report
    pooled = {code: ([], []) for code in (1, 2, 3)}  # source → (token losses, weights)
    for micro_batch, ce in micro_batches:
        for r in range(2):
            for t in range(4):
                if micro_batch["loss_mask"][r, t]:
                    delta = -ce[r, t].item() - micro_batch["teacher_logprobs"][r, t].item()
                    weight = 2 / (1 + math.exp(-delta / 0.5))
                    code = int(micro_batch["source"][r, t])
                    pooled[code][0].append(ce[r, t].item())
                    pooled[code][1].append(weight)
    for code, name in ((1, "student"), (2, "teacher"), (3, "inserted")):
        losses, weights = pooled[code]
        assert summary[f"base loss {name}"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
        assert summary[f"w mean {name}"] == pytest.approx(sum(weights) / len(weights), rel=1e-12)
    keys = list(summary)
    assert keys[-2:] == ["dropped_microbatches", "dropped_tokens"] and len(keys) == 13
