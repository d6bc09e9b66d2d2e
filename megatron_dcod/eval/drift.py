"""ExAccErr: the excess error a student accumulates because it conditions on its own prefixes.

Definition: MiniLLM (Gu et al., arXiv 2306.08543), appendix B.5 "Exposure bias", eqs. 30–32,
after Arora et al. 2022 (arXiv 2204.01171, "Why Exposure Bias Matters"). With p the teacher, q_θ
the student and x a prompt:

    R(l) = Σ_{t≤l} E_{y<t ~ q_θ(·|x)} [ Σ_v p(v|y<t,x) log p(v|y<t,x) / q_θ(v|y<t,x) ]   (30)
    ε(l) = Σ_{t≤l} E_{y<t ~ p(·|x)} [ the same per-step divergence ]                   (31)
    ExAccErr(l) = (R(l) − ε(l)) / ε(l) · 100%                                          (32)

R(l) accumulates the per-step forward KL(p‖q_θ) along prefixes the student generated, ε(l) the
same along prefixes the teacher generated (the prefixes offline distillation trains on); their
relative gap is the error that comes from the train/decode mismatch alone.

Estimator (as in the MiniLLM authors' evaluation code): K sampled responses per prompt; at step
t the divergence is averaged over the prompt's responses still generating at t (an ended
response adds no more error), summed over t ≤ l, then averaged over prompts. Two choices differ
from that code and are deliberate: step t is the distribution that produced response token t
(their slice starts one position later), and there is no +1e-3 smoothing in the mean. Every
per-step divergence comes from one forward pass of each model over the whole sampled sequence,
over the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_dcod.inference.engine import length_sorted_batches

Responses = list[list[int]]  # the sampled responses of one prompt (EOS included when sampled)
LOGITS_CHUNK_BYTES = 256 * 2**20  # the fp32 divergence runs in position chunks of this size


def stepwise_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor):
    """The inner term of eqs. 30–31: KL(p ‖ q_θ) = Σ_v p(v) (log p(v) − log q_θ(v)) at every
    position, computed in float32 or better; logits [..., v] → [...]."""
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    teacher_logprobs = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    student_logprobs = torch.log_softmax(student_logits.to(dtype), dim=-1)
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(dim=-1)


def accumulated_error(step_divergences: Sequence[Sequence[np.ndarray]], length: int) -> np.ndarray:
    """The accumulated error of eq. 30 (or 31) per prompt, for l = 1..length: at each step the
    mean divergence over the prompt's responses that reached it (0 once none has), summed over
    steps. `step_divergences[i][k]` holds response k of prompt i, one value per generated token;
    returns [prompts, length]."""
    curves = np.zeros((len(step_divergences), length))
    for row, responses in enumerate(step_divergences):
        total, live = np.zeros(length), np.zeros(length)
        for divergence in responses:
            steps = min(len(divergence), length)
            total[:steps] += divergence[:steps]
            live[:steps] += 1
        curves[row] = np.cumsum(np.divide(total, live, out=np.zeros(length), where=live > 0))
    return curves


def excess_accumulated_error(student_prefix: np.ndarray, teacher_prefix: np.ndarray) -> np.ndarray:
    """Eq. 32 in percent, from R(l) and ε(l) (each [length]). Where ε(l) = 0 the ratio is 0 if
    R(l) = 0 too (identical models: no error, hence no excess) and NaN otherwise."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (student_prefix - teacher_prefix) / teacher_prefix * 100.0
    both_zero = (teacher_prefix == 0) & (student_prefix == 0)
    return np.where(both_zero, 0.0, np.where(teacher_prefix == 0, np.nan, ratio))


@torch.inference_mode()
def divergences_along(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    prompts: Sequence[list[int]],
    responses: Sequence[Responses],
    vocab_size: int,
    batch_tokens: int = 16384,
) -> list[list[np.ndarray]]:
    """KL(p ‖ q_θ) at every step of every response, from one forward pass of each model over
    [prompt + response] (right-padded batches of similar lengths, at most `batch_tokens`
    padded tokens). Only the positions from the shortest prompt's last token on come out of
    the models, and the fp32 divergence runs in chunks of ~LOGITS_CHUNK_BYTES. The logits are
    cut to the tokenizer's `vocab_size` ids, so padded embedding rows of either model take no
    mass."""
    flat = [(i, k) for i, group in enumerate(responses) for k in range(len(group))]
    sequences = [list(prompts[i]) + list(responses[i][k]) for i, k in flat]
    result: list[list[np.ndarray]] = [[None] * len(group) for group in responses]
    lengths = [len(sequence) for sequence in sequences]
    for batch in length_sorted_batches(range(len(flat)), lengths, 2**62, batch_tokens):
        longest = max(lengths[j] for j in batch)
        input_ids = torch.zeros((len(batch), longest), dtype=torch.long)  # [b, s]
        attention_mask = torch.zeros_like(input_ids)
        for row, j in enumerate(batch):
            input_ids[row, : lengths[j]] = torch.tensor(sequences[j])
            attention_mask[row, : lengths[j]] = 1
        first = min(len(prompts[flat[j][0]]) for j in batch) - 1  # the first step's position
        kept = longest - first  # positions first..s-1: position p predicts token p+1
        divergence = _chunked_divergence(
            _logits(teacher, input_ids, attention_mask, vocab_size, kept),
            _logits(student, input_ids, attention_mask, vocab_size, kept),
        )  # [b, kept]
        for row, j in enumerate(batch):
            i, k = flat[j]
            start, steps = len(prompts[i]) - 1 - first, len(responses[i][k])
            values = divergence[row, start : start + steps].double().cpu().numpy()
            if not np.isfinite(values).all():
                raise ValueError(f"prompt {i}, response {k}: non-finite logits")
            result[i][k] = values
    return result


def _chunked_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor):
    """`stepwise_divergence` over [b, n, v] logits, a chunk of positions at a time → [b, n]."""
    rows, positions, vocab = teacher_logits.shape
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * rows * vocab))
    pieces = [
        stepwise_divergence(teacher_logits[:, a : a + chunk], student_logits[:, a : a + chunk])
        for a in range(0, positions, chunk)
    ]
    return torch.cat(pieces, dim=1)


def _logits(model, input_ids, attention_mask, vocab_size: int, kept: int) -> torch.Tensor:
    device = next(model.parameters()).device
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        logits_to_keep=kept,
    )
    return output.logits[..., :vocab_size]  # [b, kept, vocab]


@dataclass(frozen=True)
class DriftCurves:
    """ExAccErr and its two terms for l = 1..len, averaged over prompts."""

    student_prefix_error: np.ndarray
    """R(l), eq. 30: accumulated KL(p ‖ q_θ) along the student's own samples."""
    teacher_prefix_error: np.ndarray
    """ε(l), eq. 31: the same along the teacher's samples."""
    student_prefix_std: np.ndarray
    """Sample standard deviation (ddof 1) of the per-prompt R(l) over prompts."""
    teacher_prefix_std: np.ndarray
    student_live: np.ndarray
    """Fraction of the student's responses still generating at step l."""
    teacher_live: np.ndarray

    @property
    def exacc_err(self) -> np.ndarray:
        """Eq. 32, percent."""
        return excess_accumulated_error(self.student_prefix_error, self.teacher_prefix_error)


def drift_curves(
    student_prefix: Sequence[Sequence[np.ndarray]],
    teacher_prefix: Sequence[Sequence[np.ndarray]],
    length: int,
) -> DriftCurves:
    """Eqs. 30–32 from the per-step divergences along each model's own samples."""
    student_curves = accumulated_error(student_prefix, length)  # [prompts, length]
    teacher_curves = accumulated_error(teacher_prefix, length)
    return DriftCurves(
        student_prefix_error=student_curves.mean(axis=0),
        teacher_prefix_error=teacher_curves.mean(axis=0),
        student_prefix_std=_std(student_curves),
        teacher_prefix_std=_std(teacher_curves),
        student_live=_live_fraction(student_prefix, length),
        teacher_live=_live_fraction(teacher_prefix, length),
    )


def _std(curves: np.ndarray) -> np.ndarray:
    return curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])


def _live_fraction(step_divergences: Sequence[Sequence[np.ndarray]], length: int) -> np.ndarray:
    lengths = np.array([len(d) for responses in step_divergences for d in responses])
    return (lengths[None, :] >= np.arange(1, length + 1)[:, None]).mean(axis=1)
