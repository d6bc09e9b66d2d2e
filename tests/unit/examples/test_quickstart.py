"""The quickstart's pieces: the task, sampled log-probs vs a plain forward pass, the report."""

import json
import sys

import numpy as np
import pytest
import torch

from tests.helpers.training import REPO

sys.path.insert(0, str(REPO / "examples" / "quickstart"))

import arithmetic  # noqa: E402
import report  # noqa: E402
import tiny_models  # noqa: E402


def test_problems_are_distinct_held_out_and_solved_right():
    train = arithmetic.problems(300, seed=1)
    heldout = arithmetic.problems(100, seed=1, exclude=frozenset(p.text for p in train))
    assert len({p.text for p in train + heldout}) == 400  # same seed, still disjoint
    for problem in train + heldout:
        expression = problem.text.removeprefix("Compute ").removesuffix(".")
        assert problem.answer == eval(expression)  # Python's arithmetic as the reference
        assert 2 <= len(problem.operations) <= 4
        assert all(0 <= total <= arithmetic.MAX_TOTAL for total in problem.running_totals())
        for solution in (
            arithmetic.teacher_solution(problem),
            arithmetic.student_solution(problem),
        ):
            assert solution.endswith(f"\\boxed{{{eval(expression)}}}.")
    problem = arithmetic.Problem(8, (("+", 5), ("-", 6), ("+", 3)))
    assert arithmetic.teacher_solution(problem) == (
        "Step 1: 8 + 5 = 13.\nStep 2: 13 - 6 = 7.\nStep 3: 7 + 3 = 10.\n"
        "The answer is \\boxed{10}."
    )
    assert arithmetic.student_solution(problem) == (
        "8 plus 5 gives 13, minus 6 gives 7, plus 3 gives 10. So \\boxed{10}."
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoTokenizer

    from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

    directory = tmp_path_factory.mktemp("quickstart-model")
    problems = arithmetic.problems(200, seed=0)
    texts = [p.text + "\n" + arithmetic.teacher_solution(p) for p in problems]
    tokenizer = AutoTokenizer.from_pretrained(train_tiny_tokenizer(texts, directory))
    model = tiny_models.make_llama(tokenizer, hidden=32, layers=2, heads=4, seed=0)
    return tiny_models.save(model, tokenizer, directory)


def test_sampled_logprobs_equal_a_plain_forward_pass(tiny_model):
    """Batched, left-padded sampling reports the log-probs an unpadded float64 forward pass of
    each prompt + sample gives, and the top-k of that distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["Compute 1 + 2.", "Compute 10 - 3 + 5 - 1.", "Compute 4 + 4 + 4."]  # lengths differ
    samples = tiny_models.sample_with_logprobs(model, tokenizer, prompts, 12, topk=3, seed=0)
    reference = model.double()
    for prompt, sample in zip(prompts, samples):
        chat = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
        ids = torch.tensor([prompt_ids + sample["teacher_token_ids"]])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(prompt_ids) - 1 : -1]  # [t, v]
        logprobs = logits.log_softmax(-1)
        sampled = torch.tensor(sample["teacher_token_ids"])
        expected = logprobs.gather(1, sampled[:, None])[:, 0]
        assert np.allclose(sample["teacher_logprobs"], expected.numpy(), atol=1e-4)
        top_values, top_ids = logprobs.topk(3, dim=-1)
        assert [[e["id"] for e in row] for row in sample["teacher_topk"]] == top_ids.tolist()
        got = [[e["logprob"] for e in row] for row in sample["teacher_topk"]]
        assert np.allclose(got, top_values.numpy(), atol=1e-4)
        ended = sample["teacher_token_ids"][-1] == tokenizer.eos_token_id
        assert ended or len(sample["teacher_token_ids"]) == 12


def test_pretraining_targets_are_the_preprocessing_loss_mask(tiny_model):
    ((ids, loss_mask),) = tiny_models.chat_examples(tiny_model, [("Compute 1 + 2.", "3")])
    input_ids, labels = tiny_models._batch([(ids, loss_mask), (ids[:-2], loss_mask[:-2])], 0)
    assert input_ids.shape == labels.shape == (2, len(ids))
    targets = labels[0][labels[0] != tiny_models.IGNORE].tolist()
    assert targets == ids[loss_mask == 1].tolist() and len(targets) >= 2  # "3" + end of turn
    assert (labels[1, len(ids) - 2 :] == tiny_models.IGNORE).all()  # padding is never a target


def test_report_reads_tensorboard_and_eval_summaries(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for method, w_mean in (("sft", 1.0), ("dcod", 0.8)):
        for start in (0, 3):  # a resumed run: two event files, a repeated step
            writer = SummaryWriter(str(tmp_path / "checkpoints" / method / "tensorboard"))
            for step in range(start + 1, start + 4):
                writer.add_scalar("base loss", 1.0 / step, step)
                writer.add_scalar("dcod/w mean", w_mean + step / 100, step)
                writer.add_scalar("dcod/w ess", 0.9, step)
            writer.add_scalar("base loss validation", 0.5 + start, start + 3)
            writer.close()
    models = {}
    for name, accuracy in (("teacher", 0.9), ("SFT", 0.5), ("DCOD", 0.25)):
        models[name] = tmp_path / "hf" / name.lower()
        summary = {"accuracy": {"pass@1": accuracy}, "problems": 20}
        (tmp_path / "eval" / name.lower()).mkdir(parents=True)
        (tmp_path / "eval" / name.lower() / "summary.json").write_text(json.dumps(summary))
    note = "MOTAB traces: 4 trajectories, breach rate 50%"
    table = report.side_by_side(tmp_path, models, ["sft", "dcod"], tmp_path / "c.png", (note,))
    markdown, curves = table.split("\ncurves: ")
    lines = markdown.splitlines()
    assert lines[:5] == [  # the last value of each curve; SFT logged no DCOD weights here
        "| model | held-out acc | val loss | w mean | w ESS | w<0.1 | Δ mean |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| teacher | 90.0% | — | — | — | — | — |",
        "| SFT | 50.0% | 3.500 | 1.060 | 0.900 | — | — |",
        "| DCOD | 25.0% | 3.500 | 0.860 | 0.900 | — | — |",
    ]
    assert lines[5] == "" and lines[6].startswith("held-out acc: greedy pass@1 on 20 held-out")
    assert lines[7] == note and len(lines) == 8 and curves == str(tmp_path / "c.png")
    assert [report.label(m) for m in ("sft", "dcod_kl", "motab_sft")] == [
        "SFT", "DCOD_KL", "MOTAB (SFT)",
    ]  # fmt: skip
    assert (tmp_path / "results.md").read_text() == markdown + "\n"
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
