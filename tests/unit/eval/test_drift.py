"""ExAccErr (megatron_dcod/eval/drift.py, tools/measure_drift.py) against a float64 loop over
prefixes and on cases with known answers: the same model twice, and two models whose next-token
distribution does not depend on the context (R(l) = ε(l) = l · KL exactly)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.eval.drift import (
    accumulated_error,
    divergences_along,
    drift_curves,
    excess_accumulated_error,
    stepwise_divergence,
)
from tests.helpers.models import save_tiny_llama
from tests.unit.conftest import write_jsonl
from tools.measure_drift import main as measure_drift

PROMPTS = [{"problem": f"Compute {a} + {b}.", "answer": str(a + b)} for a, b in
           [(1, 2), (3, 4), (5, 6), (7, 1), (2, 9), (8, 8)]]  # fmt: skip


def _model_dir(tmp_path, tokenizer_dir, name, seed, vocab):
    directory = save_tiny_llama(tmp_path / name, vocab, seed=seed, init_std=0.3)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory)
    return directory


def _kl_float64(teacher_logits, student_logits) -> float:
    """KL(p ‖ q) by an explicit sum over the vocabulary, in float64."""
    p = np.exp(teacher_logits - np.logaddexp.reduce(teacher_logits))
    log_p = teacher_logits - np.logaddexp.reduce(teacher_logits)
    log_q = student_logits - np.logaddexp.reduce(student_logits)
    return float(sum(p[v] * (log_p[v] - log_q[v]) for v in range(len(p))))


def test_stepwise_divergence_is_the_forward_kl():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, 5, 11, generator=generator, dtype=torch.float64)
    got = stepwise_divergence(teacher, student)
    for index in np.ndindex(3, 5):
        want = _kl_float64(teacher[index].numpy(), student[index].numpy())
        assert got[index].item() == pytest.approx(want, abs=1e-12)
    assert torch.equal(
        stepwise_divergence(teacher, teacher), torch.zeros(3, 5, dtype=torch.float64)
    )


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_divergences_along_equal_a_prefix_by_prefix_loop(
    tmp_path, chat_tokenizer, tokenizer_dir, dtype, tolerance
):
    """One padded forward pass per batch equals running each prefix alone (float64 loop)."""
    vocab = len(chat_tokenizer.tokenizer)
    models = [
        AutoModelForCausalLM.from_pretrained(_model_dir(tmp_path, tokenizer_dir, name, seed, vocab))
        for name, seed in (("teacher", 1), ("student", 2))
    ]
    teacher, student = (model.to(dtype).eval() for model in models)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (4, 9, 1)]
    responses = [[rng.integers(3, vocab, size=n).tolist() for n in lengths]
                 for lengths in ((5, 1, 12), (7,), (3, 3))]  # fmt: skip
    got = divergences_along(teacher, student, prompts, responses, vocab, batch_tokens=40)
    teacher64, student64 = teacher.double(), student.double()
    for prompt, group, got_group in zip(prompts, responses, got):
        for response, divergence in zip(group, got_group):
            assert divergence.shape == (len(response),)
            for step in range(len(response)):
                context = torch.tensor([prompt + response[:step]])
                with torch.no_grad():
                    logits_t = teacher64(context).logits[0, -1, :vocab].numpy()
                    logits_s = student64(context).logits[0, -1, :vocab].numpy()
                want = _kl_float64(logits_t, logits_s)
                assert divergence[step] == pytest.approx(want, rel=tolerance, abs=tolerance)


def test_accumulated_error_and_curves_equal_plain_loops():
    rng = np.random.default_rng(1)
    per_prompt = [[rng.random(n) for n in lengths] for lengths in ((3, 6), (1,), (6, 6, 2))]
    length = 5
    curves = accumulated_error(per_prompt, length)
    for row, responses in enumerate(per_prompt):
        running = 0.0
        for step in range(length):
            alive = [d[step] for d in responses if len(d) > step]
            running += sum(alive) / len(alive) if alive else 0.0
            assert curves[row, step] == pytest.approx(running, abs=1e-12)
    teacher = [[rng.random(n) for n in (4, 5)] for _ in range(3)]
    result = drift_curves(per_prompt, teacher, length)
    np.testing.assert_allclose(result.student_prefix_error, curves.mean(axis=0))
    want_exacc = curves.mean(0) - accumulated_error(teacher, length).mean(0)
    want_exacc /= accumulated_error(teacher, length).mean(0) / 100
    np.testing.assert_allclose(result.exacc_err, want_exacc)
    # live fractions: 7 student responses; 5 still going at step 2 (lengths 3, 6, 6, 6, 2)
    assert result.student_live[1] == pytest.approx(5 / 6)
    assert result.teacher_live.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5]


def test_excess_error_where_the_teacher_has_none():
    got = excess_accumulated_error(np.array([0.0, 1.0, 3.0]), np.array([0.0, 0.0, 2.0]))
    assert got[0] == 0.0 and math.isnan(got[1]) and got[2] == pytest.approx(50.0)


def _run(student, teacher, data, out, *flags):
    code = measure_drift(["--student", str(student), "--teacher", str(teacher),
                          "--data", str(data), "--out", str(out), "--prompt-template",
                          "{problem}", "--samples", "3", "--max-new-tokens", "12",
                          *flags])  # fmt: skip
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def test_the_same_model_twice_has_no_excess_error(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    summary = _run(tiny_model_dir, tiny_model_dir, data, tmp_path / "out")
    curves = summary["curves"]
    assert summary["prompts"] == len(PROMPTS) and len(curves["exacc_err"]) == 12
    assert max(curves["student_prefix_error"]) < 1e-6
    assert max(curves["teacher_prefix_error"]) < 1e-6
    assert all(value == 0.0 for value in curves["exacc_err"])
    assert (tmp_path / "out" / "drift.png").stat().st_size > 0


def _context_free_model(tmp_path, tokenizer_dir, name, seed, vocab, eos_id):
    """Every embedding row equal: attention averages identical values, so the next-token
    distribution is the same after any prefix. EOS gets no mass (every response runs the full
    length)."""
    directory = _model_dir(tmp_path, tokenizer_dir, name, seed, vocab)
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.copy_(embeddings[:1].expand_as(embeddings))
        hidden = model.model(torch.tensor([[5]])).last_hidden_state[0, -1]  # [h]
        model.lm_head.weight[eos_id] = -200 * hidden / hidden.norm()
    model.save_pretrained(directory)
    return directory, model


def test_context_free_models_accumulate_exactly_l_times_their_kl(
    tmp_path, chat_tokenizer, tokenizer_dir
):
    vocab, eos = len(chat_tokenizer.tokenizer), chat_tokenizer.tokenizer.eos_token_id
    teacher_dir, teacher = _context_free_model(tmp_path, tokenizer_dir, "t", 1, vocab, eos)
    student_dir, student = _context_free_model(tmp_path, tokenizer_dir, "s", 2, vocab, eos)
    with torch.no_grad():
        context = torch.tensor([[7, 9, 11]])
        logits = [m.double()(context).logits[0, -1, :vocab].numpy() for m in (teacher, student)]
    kl = _kl_float64(*logits)
    assert kl > 0.05  # the two models do differ
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    summary = _run(student_dir, teacher_dir, data, tmp_path / "out")
    lengths = np.arange(1, 13)
    curves = summary["curves"]
    np.testing.assert_allclose(curves["student_prefix_error"], kl * lengths, rtol=1e-4)
    np.testing.assert_allclose(curves["teacher_prefix_error"], kl * lengths, rtol=1e-4)
    assert np.abs(curves["exacc_err"]).max() < 0.05  # percent
    assert curves["student_live"] == [1.0] * 12


def test_more_prompts_resume_the_finished_ones(tmp_path, chat_tokenizer, tokenizer_dir, capsys):
    vocab = len(chat_tokenizer.tokenizer)
    teacher = _model_dir(tmp_path, tokenizer_dir, "teacher", 1, vocab)
    student = _model_dir(tmp_path, tokenizer_dir, "student", 2, vocab)
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    _run(student, teacher, data, tmp_path / "resumed", "--num-prompts", "2")
    first = (tmp_path / "resumed" / "generations.jsonl").read_text().splitlines()
    resumed = _run(student, teacher, data, tmp_path / "resumed", "--num-prompts", "6",
                   "--batch-size", "4")  # fmt: skip
    lines = (tmp_path / "resumed" / "generations.jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 6
    fresh = _run(student, teacher, data, tmp_path / "fresh", "--num-prompts", "6")
    assert resumed["curves"] == fresh["curves"]  # per-sample seeds: batching changes nothing
    assert resumed["prompts"] == 6 and resumed["at"]["12"]["exacc_err"] is not None
    code = measure_drift(["--student", str(student), "--teacher", str(teacher), "--data",
                          str(data), "--out", str(tmp_path / "fresh"), "--seed", "3"])  # fmt: skip
    assert code == 1 and "other settings" in capsys.readouterr().err


def test_refuses_models_with_other_vocabularies(tmp_path, tiny_model_dir, capsys):
    from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

    other = tmp_path / "other"
    train_tiny_tokenizer(["completely different words here"] * 20, other, 300)
    save_tiny_llama(other, 300)
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    code = measure_drift(["--student", str(tiny_model_dir), "--teacher", str(other),
                          "--data", str(data), "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 1 and "different vocabularies" in capsys.readouterr().err


class _FakeEngine:
    """An engine whose generations are given: one ended by EOS, one cut at the length limit."""

    stop_ids = {2, 9}

    class tokenizer:
        eos_token_id = 2

    def generate(self, contexts, sampling, seeds):
        from megatron_dcod.inference.engine import Generation

        return [Generation("", [5, 6], "eos"), Generation("", [7, 8, 7], "length")] * (
            len(contexts) // 2
        )


def test_a_sampled_eos_is_a_step_and_a_cut_response_has_none():
    from megatron_dcod.config import DriftConfig
    from megatron_dcod.eval.benchmarks import Problem
    from megatron_dcod.eval.drift_run import _sample
    from megatron_dcod.inference.engine import SamplingConfig

    config = DriftConfig(student="s", teacher="t", data="d", out="o", samples=2)
    problems = [Problem(0, "0", "text", "", "d:1")]
    responses = _sample(_FakeEngine(), [[1, 3]], problems, SamplingConfig(1, 1, 4, 0), config, "a")
    assert responses == [[[5, 6, 2], [7, 8, 7]]]


def test_prompts_without_answers_and_a_changed_data_file(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"problem": p["problem"]} for p in PROMPTS])
    summary = _run(tiny_model_dir, tiny_model_dir, data, tmp_path / "out", "--num-prompts", "0")
    assert summary["prompts"] == len(PROMPTS)  # 0: every prompt; no answer field needed
    write_jsonl(
        data, [{"problem": "Something else."}] + [{"problem": p["problem"]} for p in PROMPTS]
    )
    code = measure_drift(["--student", str(tiny_model_dir), "--teacher", str(tiny_model_dir),
                          "--data", str(data), "--out", str(tmp_path / "out"), "--prompt-template",
                          "{problem}", "--samples", "3", "--max-new-tokens", "12"])  # fmt: skip
    assert code == 1 and "the data changed" in capsys.readouterr().err
