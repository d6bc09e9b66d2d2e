"""The corrected loss against float64 reference loops over tokens (docs/method.md)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction.objective import (
    PickedLogprobs,
    corrected_loss,
    picked_ids,
    summarize_stats,
    token_weights,
)
from megatron_dcod.correction.token_losses import todi_loss, topk_kl_loss

VOCAB, TOPK = 11, 3

# Two rows of 8 positions. Traces (segment ids): row 0 = trace 0 (5 tokens) + trace 1 (1 token,
# supervised) + padding trace 2; row 1 = trace 3 (all masked) + trace 4 (4 tokens).
SEGMENTS = [[0, 0, 0, 0, 0, 1, 2, 2], [3, 3, 3, 3, 4, 4, 4, 4]]
MASK = [[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]


def make_batch(seed=0, extreme=False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 8, VOCAB, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (2, 8), generator=generator)
    teacher = -torch.rand(2, 8, generator=generator, dtype=torch.float64) * 4
    if extreme:  # Δ of ±1e4: the sigmoid saturates, nothing overflows
        teacher[0, 1], teacher[1, 5] = -1e4, 0.0
        logits[1, 5] = torch.full((VOCAB,), -50.0, dtype=torch.float64)
        logits[1, 5, (labels[1, 5] + 1) % VOCAB] = 1e4
    mask = torch.tensor(MASK, dtype=torch.float64)
    topk_ids = torch.stack(
        [torch.randperm(VOCAB, generator=generator)[:TOPK] for _ in range(16)]
    ).view(2, 8, TOPK)
    topk_logprobs = torch.log_softmax(torch.randn(2, 8, VOCAB, generator=generator), -1)
    topk_logprobs = topk_logprobs.gather(-1, topk_ids)
    batch = {
        "labels": labels,
        "loss_mask": mask,
        "segment_ids": torch.tensor(SEGMENTS),
        "teacher_logprobs": teacher * mask,
        "ref_logprobs": -torch.rand(2, 8, generator=generator, dtype=torch.float64) * 3 * mask,
        "teacher_topk_ids": topk_ids,
        "teacher_topk_logprobs": topk_logprobs.to(torch.float16),
    }
    return logits, batch


def token_ce(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 8)


def reference_weights(config, logp, batch):
    """w per position, float64, by explicit loops over traces and tokens."""
    mask, segments = batch["loss_mask"].tolist(), batch["segment_ids"].tolist()
    teacher, ref = batch["teacher_logprobs"].tolist(), batch["ref_logprobs"].tolist()
    w = [[0.0] * 8 for _ in range(2)]
    for row in range(2):
        for t in range(8):
            same = [u for u in range(8) if segments[row][u] == segments[row][t]]
            delta = {u: logp[row][u] - teacher[row][u] for u in same if mask[row][u]}
            if config.weighting == "sft":
                w[row][t] = 1.0
            elif config.weighting == "dft":
                w[row][t] = math.exp(logp[row][t])
            elif config.weighting == "iw_sft":
                ratios = [logp[row][u] - ref[row][u] for u in same if mask[row][u]]
                mean = sum(ratios) / len(ratios) if ratios else 0.0
                w[row][t] = min(max(math.exp(mean), 0.0), config.iw_sft_max_weight)
            else:
                if config.scope == "token":
                    d = logp[row][t] - teacher[row][t]
                elif config.scope == "prefix":
                    seen = [delta[u] for u in same if u <= t and u in delta]
                    d = sum(seen) / len(seen) if seen else 0.0
                else:
                    d = sum(delta.values()) / len(delta) if delta else 0.0
                z = (d - config.offset) / config.temperature
                sig = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
                w[row][t] = config.scale * sig
                if config.clip_min is not None:
                    w[row][t] = max(w[row][t], config.clip_min)
                if config.clip_max is not None:
                    w[row][t] = min(w[row][t], config.clip_max)
    return torch.tensor(w, dtype=torch.float64)


CONFIGS = [
    CorrectionConfig(weighting="sft"),
    CorrectionConfig(weighting="dft"),
    CorrectionConfig(weighting="iw_sft"),
    CorrectionConfig(weighting="dcod"),
    CorrectionConfig(weighting="dcod", scope="prefix", temperature=0.5, offset=-0.3),
    CorrectionConfig(weighting="dcod", scope="sequence", scale=3.0),
    CorrectionConfig(weighting="dcod", clip_min=0.5, clip_max=1.5),
    CorrectionConfig(weighting="dcod", normalization="weights"),
]


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.weighting}-{c.scope}")
def test_ce_weightings_match_float64_loop(config, extreme):
    logits, batch = make_batch(extreme=extreme)
    logits.requires_grad_(True)
    result = corrected_loss(config, token_ce(logits, batch["labels"]), batch)
    loss = result.loss_sum / result.normalizer
    loss.backward()

    reference_logits = logits.detach().clone().requires_grad_(True)
    ce = token_ce(reference_logits, batch["labels"])
    w = reference_weights(config, (-ce.detach()).tolist(), batch)  # constants: detached weights
    mask = batch["loss_mask"]
    normalizer = mask.sum() if config.normalization == "tokens" else (w * mask).sum()
    reference = (
        sum(mask[r, t] * w[r, t] * ce[r, t] for r in range(2) for t in range(8)) / normalizer
    )
    reference.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.normalizer, normalizer, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-10, atol=1e-12)
    assert not logits.grad[1, :4].any()  # the all-masked trace gets no gradient


def test_sft_equals_plain_masked_cross_entropy_exactly():
    logits, batch = make_batch()
    logits = logits.float()
    ce = token_ce(logits, batch["labels"])
    batch["loss_mask"] = batch["loss_mask"].float()
    result = corrected_loss(CorrectionConfig(), ce, batch)
    assert torch.equal(result.loss_sum, (ce * batch["loss_mask"]).sum())
    assert result.normalizer.item() == sum(map(sum, MASK))


def test_dcod_weights_bounds_and_clipping_edges():
    """Bounds on the library's weights (not the reference's), saturated Δ = ±1e4 included."""
    logits, batch = make_batch(extreme=True)
    ce = token_ce(logits, batch["labels"])
    mask = batch["loss_mask"].bool()
    log_ratio = -ce - batch["teacher_logprobs"]
    for clip_min, clip_max, low, high in ((None, None, 0, 2), (0.5, 1.5, 0.5, 1.5), (1, 1, 1, 1)):
        config = CorrectionConfig(weighting="dcod", clip_min=clip_min, clip_max=clip_max)
        w = token_weights(config, -ce, log_ratio, batch)[mask]
        assert low <= w.min() and w.max() <= high and torch.isfinite(w).all()
        reference = reference_weights(config, (-ce).tolist(), batch)[mask]
        torch.testing.assert_close(w, reference, rtol=1e-12, atol=1e-12)
    saturated = token_weights(CorrectionConfig(weighting="dcod"), -ce, log_ratio, batch)
    assert saturated[0, 1] == 2.0 and saturated[1, 5] == 0.0  # Δ = +1e4 and −1e4


def test_weight_statistics_against_numpy():
    """w mean, w std, w ess, w<0.1 frac and delta mean of the summed stats, recomputed with
    numpy from the reference weights and Δ of the supervised tokens."""
    logits, batch = make_batch(seed=5)
    batch["teacher_logprobs"][1, 4] = 3.0  # one strongly down-weighted token: w < 0.1 counts
    config = CorrectionConfig(weighting="dcod", temperature=0.7)
    ce = token_ce(logits, batch["labels"])
    result = corrected_loss(config, ce, batch)
    summary = summarize_stats(result.stats)
    mask = batch["loss_mask"].bool().numpy()
    w = reference_weights(config, (-ce).tolist(), batch).numpy()[mask]
    delta = (-ce - batch["teacher_logprobs"]).numpy()[mask]
    expected = {
        "w mean": w.mean(),
        "w std": w.std(),
        "w ess": w.sum() ** 2 / (len(w) * (w**2).sum()),
        "w<0.1 frac": (w < 0.1).mean(),
        "delta mean": delta.mean(),
    }
    assert 0 < expected["w<0.1 frac"] < 1 and expected["w std"] > 0.1
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("max_weight", [16.0, 3.0])
def test_iw_sft_clamp_is_reached_and_configurable(max_weight):
    """A trace the student now likes far more than π_0 (mean log-ratio 5: e^5 ≈ 148) is
    clamped at --dcod-iw-sft-max-weight; a trace it likes less is not."""
    logits, batch = make_batch(seed=2)
    ce = token_ce(logits, batch["labels"])
    batch["ref_logprobs"] = torch.where(batch["loss_mask"] > 0, -ce - 5.0, 0.0)  # trace 0, 4
    batch["ref_logprobs"][0, 5] = -ce[0, 5] + 1.0  # trace 1: e^-1
    config = CorrectionConfig(weighting="iw_sft", iw_sft_max_weight=max_weight)
    w = token_weights(config, -ce, None, batch)
    assert w[0, 1] == max_weight and w[1, 4] == max_weight
    assert w[0, 5].item() == pytest.approx(math.exp(-1.0))
    reference = reference_weights(config, (-ce).tolist(), batch)
    mask = batch["loss_mask"].bool()
    torch.testing.assert_close(w[mask], reference[mask], rtol=1e-12, atol=0)


def reference_topk_loss(config, logits, batch):
    """KD / ToDi per token, float64 loops over the stored top-k ids."""
    losses = torch.zeros(2, 8, dtype=torch.float64)
    logq_all = torch.log_softmax(logits, -1)
    for r in range(2):
        for t in range(8):
            ids = batch["teacher_topk_ids"][r, t].tolist()
            logp_t = batch["teacher_topk_logprobs"][r, t].double().tolist()
            logq = [logq_all[r, t, i] for i in ids]
            if config.topk_mode == "renormalize":  # the teacher only: q keeps its full support
                zt = math.log(sum(map(math.exp, logp_t)))
                logp_t = [x - zt for x in logp_t]
            else:
                logp_t = logp_t + [math.log(1 - sum(map(math.exp, logp_t)))]
                logq = logq + [torch.log(1 - sum(torch.exp(x) for x in logq))]
            total = 0.0
            for p_log, q_log in zip(logp_t, logq):
                p, q = math.exp(p_log), torch.exp(q_log)
                if config.base_loss == "kl":
                    total = total + p * (p_log - q_log)
                else:
                    alpha = 1 / (1 + math.exp(-config.todi_beta * (p_log - q_log.item())))
                    total = total + alpha * p * (p_log - q_log) + (1 - alpha) * q * (q_log - p_log)
            losses[r, t] = total
    return losses


@pytest.mark.parametrize("mode", ["renormalize", "tail"])
@pytest.mark.parametrize("base_loss", ["kl", "todi"])
def test_topk_losses_match_float64_loop(base_loss, mode):
    config = CorrectionConfig(weighting="dcod", base_loss=base_loss, topk_mode=mode, todi_beta=0.7)
    logits, batch = make_batch(seed=3)
    logits.requires_grad_(True)
    result = corrected_loss(config, logits, batch)
    (result.loss_sum / result.normalizer).backward()

    reference_logits = logits.detach().clone().requires_grad_(True)
    token_loss = reference_topk_loss(config, reference_logits, batch)
    logp = torch.log_softmax(reference_logits.detach(), -1).gather(-1, batch["labels"][..., None])
    w = reference_weights(config, logp[..., 0].tolist(), batch)
    mask = batch["loss_mask"]
    reference = (mask * w * token_loss).sum() / mask.sum()
    reference.backward()
    torch.testing.assert_close(result.loss_sum / result.normalizer, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-9)


def test_required_arrays_and_bad_knobs():
    assert CorrectionConfig().required_arrays() == ()
    assert CorrectionConfig(weighting="dcod").required_arrays() == ("teacher_logprobs",)
    assert CorrectionConfig(weighting="iw_sft", base_loss="kl").required_arrays() == (
        "ref_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
    )
    with pytest.raises(ValueError, match="weighting must be one of"):
        CorrectionConfig(weighting="ppo")
    with pytest.raises(ValueError, match="temperature must be positive"):
        CorrectionConfig(temperature=0.0)


def student_with_mass_outside(teacher_topk: torch.Tensor, outside: float) -> torch.Tensor:
    """Full-vocabulary log-probs of the teacher's k ids (ids 0..k-1 of a vocabulary of 8) for a
    student that copies the teacher's shape on them and puts `outside` of its mass elsewhere."""
    k = teacher_topk.shape[-1]
    teacher = teacher_topk.softmax(-1)
    full = torch.cat([(1 - outside) * teacher, torch.full((8 - k,), outside / (8 - k))])
    return full.log()[:k]  # what vocab_parallel_logprobs_at returns at the k ids


@pytest.mark.parametrize("mode", ["renormalize", "tail"])
@pytest.mark.parametrize("base_loss", ["kl", "todi"])
def test_topk_losses_see_mass_outside_the_teacher_ids(base_loss, mode):
    """≥ 0; 0 only where the student matches the teacher: on the k ids with nothing elsewhere
    (renormalize), or on the ids and the remaining mass (tail: the teacher leaves 10% outside);
    growing as the student moves more mass off the teacher's ids. Renormalizing the student
    over the k ids, as a flawed first version did, scores every such student 0."""
    loss = topk_kl_loss if base_loss == "kl" else (lambda s, t, m: todi_loss(s, t, m, 0.7))
    shape = torch.tensor([-0.4, -1.5, -2.5], dtype=torch.float64).log_softmax(0)  # on the ids
    teacher_outside = 0.0 if mode == "renormalize" else 0.1
    teacher_topk = shape + math.log(1 - teacher_outside)  # what the dataset stores
    losses = []
    for outside in (teacher_outside, 0.2, 0.35, 0.5, 0.9):
        student = student_with_mass_outside(shape, outside)
        losses.append(loss(student[None, None], teacher_topk[None, None], mode).item())
    assert abs(losses[0]) < 1e-12  # the student is the teacher
    assert all(later > earlier for earlier, later in zip(losses, losses[1:])), losses
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # any student distribution: never negative
        student = torch.log_softmax(torch.randn(8, generator=generator, dtype=torch.float64), 0)
        assert loss(student[None, None, :3], teacher_topk[None, None], mode).item() >= 0


# who wrote each position: 0 off the mask, else 1 student, 2 teacher, 3 inserted
SOURCE = [[0, 1, 2, 0, 3, 2, 0, 0], [0, 0, 0, 0, 1, 3, 2, 2]]
SOURCE_CONFIGS = [
    CorrectionConfig(weighting="dcod"),
    CorrectionConfig(weighting="dcod", scope="prefix", temperature=0.5),
    CorrectionConfig(weighting="iw_sft"),
    CorrectionConfig(weighting="dcod", base_loss="kl"),
]


def with_sources(batch, source=SOURCE):
    return batch | {"source": torch.tensor(source, dtype=torch.uint8)}


@pytest.mark.parametrize("config", SOURCE_CONFIGS, ids=lambda c: f"{c.weighting}-{c.base_loss}")
def test_per_source_means_match_float64(config):
    """`base loss <source>` and `w mean <source>`: means over that source's supervised tokens of
    the reference token losses and weights (float64 loops)."""
    logits, batch = make_batch(seed=4)
    batch = with_sources(batch)
    if config.base_loss == "ce":
        output, token_loss = token_ce(logits, batch["labels"]), token_ce(logits, batch["labels"])
        logp = (-token_loss).tolist()
    else:
        output, token_loss = logits, reference_topk_loss(config, logits, batch)
        logp = torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None])[..., 0]
        logp = logp.tolist()
    summary = summarize_stats(corrected_loss(config, output, batch).stats, per_source=True)
    w = reference_weights(config, logp, batch)
    for code, name in ((1, "student"), (2, "teacher"), (3, "inserted")):
        positions = [(r, t) for r in range(2) for t in range(8) if SOURCE[r][t] == code]
        assert positions and all(MASK[r][t] for r, t in positions)
        loss = sum(token_loss[r, t].item() for r, t in positions) / len(positions)
        weight = sum(w[r, t].item() for r, t in positions) / len(positions)
        assert summary[f"base loss {name}"] == pytest.approx(loss, rel=1e-10, abs=1e-12), name
        assert summary[f"w mean {name}"] == pytest.approx(weight, rel=1e-10, abs=1e-12), name
    assert "base loss student" not in summarize_stats(corrected_loss(config, output, batch).stats)
    no_inserted = [[1 if s == 3 else s for s in row] for row in SOURCE]
    result = corrected_loss(config, output, with_sources(batch, no_inserted))
    summary = summarize_stats(result.stats, per_source=True)
    assert math.isnan(summary["base loss inserted"]) and math.isnan(summary["w mean inserted"])


@pytest.mark.parametrize("sources", [("teacher",), ("student", "inserted")])
@pytest.mark.parametrize(
    "config",
    [
        CorrectionConfig(weighting="dcod", scope="prefix"),
        CorrectionConfig(weighting="dcod", scope="sequence", normalization="weights"),
        CorrectionConfig(weighting="iw_sft"),
        CorrectionConfig(weighting="dft", base_loss="todi"),
    ],
    ids=lambda c: f"{c.weighting}-{c.scope}-{c.base_loss}",
)
def test_restricting_sources_equals_zeroing_the_others_loss_mask(config, sources):
    logits, batch = make_batch(seed=6)
    batch = with_sources(batch)
    results, grads = [], []
    restricted = replace(config, train_sources=sources)
    codes = torch.tensor([{"student": 1, "teacher": 2, "inserted": 3}[s] for s in sources])
    masked = batch | {"loss_mask": batch["loss_mask"] * torch.isin(batch["source"], codes)}
    for run_config, run_batch in ((restricted, batch), (config, masked)):
        leaf = logits.detach().clone().requires_grad_(True)
        output = token_ce(leaf, batch["labels"]) if config.base_loss == "ce" else leaf
        result = corrected_loss(run_config, output, run_batch)
        (result.loss_sum / result.normalizer).backward()
        results.append(result)
        grads.append(leaf.grad)
    trained, reference = results
    assert 0 < reference.supervised_tokens < batch["loss_mask"].sum()
    for name in ("loss_sum", "normalizer", "supervised_tokens", "base_loss_sum", "stats"):
        torch.testing.assert_close(getattr(trained, name), getattr(reference, name), rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    summary = summarize_stats(trained.stats, per_source=True)
    left_out = {"student", "teacher", "inserted"} - set(sources)
    assert all(math.isnan(summary[f"base loss {name}"]) for name in left_out)


def test_train_sources_are_checked():
    assert CorrectionConfig(train_sources=("teacher",)).required_arrays() == ("source",)
    assert not CorrectionConfig(train_sources=("inserted", "teacher", "student")).restricts_sources
    for bad in ((), ("teacher", "teacher"), ("oracle",)):
        with pytest.raises(ValueError, match="train sources must be distinct names"):
            CorrectionConfig(train_sources=bad)
    logits, batch = make_batch()
    with pytest.raises(ValueError, match="need the batch's `source` array"):
        config = CorrectionConfig(train_sources=("teacher",))
        corrected_loss(config, token_ce(logits, batch["labels"]), batch)


@pytest.mark.parametrize(
    "config",
    [
        CorrectionConfig(weighting="dcod", scope="prefix"),
        CorrectionConfig(weighting="iw_sft"),
        CorrectionConfig(weighting="dcod", base_loss="kl", normalization="weights"),
        CorrectionConfig(weighting="dft", base_loss="todi", topk_mode="tail"),
    ],
    ids=lambda c: f"{c.weighting}-{c.base_loss}",
)
def test_picked_logprobs_give_the_loss_and_gradient_of_the_logits(config):
    """The DeepSpeed engine's output (log-probs at `picked_ids`) against Megatron's (its per-
    token CE for `ce`, the logits for `kl`/`todi`): the same loss, normalizer and gradient."""
    logits, batch = make_batch(seed=3)
    logits.requires_grad_(True)
    megatron_output = token_ce(logits, batch["labels"]) if config.base_loss == "ce" else logits
    expected = corrected_loss(config, megatron_output, batch)
    (expected.loss_sum / expected.normalizer).backward()
    expected_grad, logits.grad = logits.grad.clone(), None
    picked = logits.log_softmax(-1).gather(-1, picked_ids(config, batch))  # [b, s, 1 (+k)]
    assert picked.shape[-1] == (1 if config.base_loss == "ce" else 1 + TOPK)
    result = corrected_loss(config, PickedLogprobs(picked), batch)
    (result.loss_sum / result.normalizer).backward()
    torch.testing.assert_close(result.loss_sum, expected.loss_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.normalizer, expected.normalizer, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.stats, expected.stats, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert logits.grad.abs().sum() > 0
