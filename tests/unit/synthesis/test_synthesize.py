"""Synthesis end to end on tiny real HF models: the batched step-synchronous run equals an
independent one-trajectory-at-a-time reference loop, resume after a kill, refused settings,
bad prompts, and teacher mode with --keep correct."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.data.chat import ChatTokenizer
from megatron_dcod.synthesis import loops, run
from megatron_dcod.synthesis.config import SynthesisConfig
from megatron_dcod.synthesis.loops import LanguageModel, Models
from megatron_dcod.synthesis.prompts import PromptError
from megatron_dcod.synthesis.run import synthesize
from tests.helpers.models import save_tiny_llama
from tests.unit.conftest import write_jsonl
from tests.unit.synthesis.scripted import CharTokenizer, ScriptedEngine

QUESTIONS = ["Compute 12 + 7.", "What is 3 * 4?", "Add 7", "Let us think", "Be brief: 2 + 2?"]
MONITOR = dict(step_stop=("e",), max_step_tokens=8, max_tokens=24, epsilon0=0.045, dtype="fp32")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, chat_tokenizer, tokenizer_dir):
    directory = tmp_path_factory.mktemp("student")
    save_tiny_llama(directory, len(chat_tokenizer.tokenizer), seed=4, init_std=0.3)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory)
    return directory


@pytest.fixture
def prompts(tmp_path):
    records = [{"question": q, "answer": str(i), "id": f"q{i}"} for i, q in enumerate(QUESTIONS)]
    return write_jsonl(tmp_path / "prompts.jsonl", records)


def settings(tmp_path, prompts, tiny_model_dir, student_dir, **overrides):
    values = dict(
        method="motab", prompts=(str(prompts),), teacher=str(tiny_model_dir),
        student=str(student_dir), out=str(tmp_path / "out.jsonl"), **MONITOR,
    )  # fmt: skip
    return SynthesisConfig(**(values | overrides))


def records(path):
    return [json.loads(line) for line in open(path)]


class Reference:
    """MOTAB / SKD greedy, one trajectory at a time, full forward passes without a cache."""

    def __init__(self, teacher_dir, student_dir, tokenizer_dir, config):
        load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        self.teacher, self.student, self.config = load(teacher_dir), load(student_dir), config
        self.chat = ChatTokenizer(tokenizer_dir)
        self.tokenizer = self.chat.tokenizer
        self.eos = {self.tokenizer.eos_token_id, self.student.generation_config.eos_token_id}

    @torch.no_grad()
    def generate(self, model, ids, max_new, stop):
        max_new, new = min(max_new, 256 - len(ids)), []
        while len(new) < max_new:
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token in self.eos:
                return self.tokenizer.decode(new, skip_special_tokens=True), new, "eos"
            new.append(token)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if stop and stop in text:
                return text[: text.index(stop) + len(stop)], new, "stop"
        return self.tokenizer.decode(new, skip_special_tokens=True), new, "length"

    @torch.no_grad()
    def score(self, model, context, continuation, k):
        logp = torch.log_softmax(
            model(torch.tensor([context + continuation])).logits[0].double(), -1
        )
        logprobs = [logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation)]
        top = torch.softmax(logp[-1].topk(k).values, -1)
        return logprobs, -(top * top.log()).sum().item()

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def motab(self, question):
        c = self.config
        text = self.chat.render([{"role": "user", "content": question}], add_generation_prompt=True)
        context = self.encode(text)
        contexts, steps, used = [], [], 0
        entropy = self.score(self.teacher, context, [], c.entropy_topk)[1]
        while True:
            step, new, finish = self.generate(self.student, context, min(8, 24 - used), "e")
            if not step:
                return steps, None, None
            logprobs, next_entropy = self.score(self.teacher, context, self.encode(step), 20)
            value = math.exp(sum(logprobs) / len(logprobs))
            boundary = c.epsilon0 * math.exp(-c.theta * entropy)
            steps.append((step, new, value, boundary, value >= boundary))
            contexts.append(context)
            used += len(new)
            if value < boundary:
                drops = {k: steps[k][2] - steps[k - 1][2] for k in range(1, len(steps))}
                t_star = min(drops, key=drops.get) if drops else 0
                before = sum(len(s[1]) for s in steps[:t_star])
                answer = self.generate(self.teacher, contexts[t_star], max(256, 24 - before), None)
                return steps, t_star, answer[0]
            context, entropy = context + self.encode(step), next_entropy
            if finish != "stop" or used >= 24:
                return steps, None, None


def test_batched_motab_equals_a_one_at_a_time_reference(
    tmp_path, prompts, tiny_model_dir, student_dir, tokenizer_dir
):
    config = settings(tmp_path, prompts, tiny_model_dir, student_dir, temperature=0.0, epsilon0=0.042,
                      responses_per_prompt=1, max_live_trajectories=16)  # fmt: skip
    summary = synthesize(config)
    reference = Reference(tiny_model_dir, student_dir, tokenizer_dir, config)
    out = records(config.out)
    assert [r["question"] for r in out] == QUESTIONS and summary["complete"]
    assert 0 < summary["breaches"] < len(QUESTIONS)  # both paths are exercised
    for record, question in zip(out, QUESTIONS):
        steps, t_star, continuation = reference.motab(question)
        assert [s["text"] for s in record["steps"]] == [s[0] for s in steps]
        assert [s["value"] for s in record["steps"]] == pytest.approx(
            [s[2] for s in steps], abs=1e-6
        )
        assert [s["boundary"] for s in record["steps"]] == pytest.approx(
            [s[3] for s in steps], abs=1e-6
        )
        assert [s["accepted"] for s in record["steps"]] == [s[4] for s in steps]
        assert record["t_star"] == t_star
        student_text = "".join(s[0] for s in steps)
        if t_star is None:
            assert record["response"] == student_text.rstrip()
        else:
            joined = student_text + "\n\nHowever,\n\n"[2 * student_text.endswith("\n\n") :]
            assert record["response"] == (joined + continuation).rstrip()


def test_batching_does_not_change_sampled_trajectories(tmp_path, tiny_model_dir, student_dir):
    many = [{"question": f"{q} ({i})"} for i in range(2) for q in QUESTIONS]
    prompts = write_jsonl(tmp_path / "many.jsonl", many)
    for method in ("motab", "skd"):
        runs = {}
        for live in (16, 1):  # all together, and one trajectory at a time
            config = settings(tmp_path, prompts, tiny_model_dir, student_dir, method=method,
                              temperature=1.0, responses_per_prompt=1, max_live_trajectories=live,
                              out=str(tmp_path / f"{method}-{live}.jsonl"))  # fmt: skip
            runs[live] = (synthesize(config), records(config.out))
        assert runs[16][1] == runs[1][1]
        summary = runs[16][0]
        if method == "motab":
            assert 0 < summary["breaches"] < len(many)  # accepted and backtracked trajectories
        else:
            sources = {s["source"] for r in runs[16][1] for s in r["steps"]}
            assert sources == {"student", "teacher"}  # both SKD paths taken


def test_resume_after_a_kill_gives_the_uninterrupted_file(
    tmp_path, prompts, tiny_model_dir, student_dir, monkeypatch
):
    whole = settings(tmp_path, prompts, tiny_model_dir, student_dir, temperature=1.0,
                     responses_per_prompt=2, max_live_trajectories=4, out=str(tmp_path / "whole.jsonl"))  # fmt: skip
    synthesize(whole)
    killed = settings(tmp_path, prompts, tiny_model_dir, student_dir, temperature=1.0,
                      responses_per_prompt=2, max_live_trajectories=4)  # fmt: skip
    rounds, real_round = [0], loops.motab_round

    def dies_at_round_5(live, models, config):
        rounds[0] += 1
        if rounds[0] == 5:
            raise KeyboardInterrupt
        real_round(live, models, config)

    monkeypatch.setitem(run.ROUNDS, "motab", dies_at_round_5)
    with pytest.raises(KeyboardInterrupt):
        synthesize(killed)
    done = [json.loads(line)["prompt_index"] for line in open(killed.out + ".done")]
    assert 0 < len(done) < len(QUESTIONS)
    unfinished = next(i for i in range(len(QUESTIONS)) if i not in done)
    with open(killed.out, "a") as out:  # written before the kill, but its prompt is not done
        out.write(json.dumps({"prompt_index": unfinished, "response": "stale"}) + "\n")
        out.write('{"prompt_index": 4, "response": "cut mid-wri')  # a write the kill cut
    assert not json.loads(open(killed.out + ".summary.json").read())["complete"]
    monkeypatch.setitem(run.ROUNDS, "motab", real_round)
    summary = synthesize(killed)
    assert records(killed.out) == records(whole.out)
    assert open(killed.out).read() == open(whole.out).read()
    assert summary["complete"] and summary["trajectories"] == 2 * len(QUESTIONS)
    with pytest.raises(ValueError, match="written with epsilon0=0.045, this run has epsilon0=0.3"):
        synthesize(settings(tmp_path, prompts, tiny_model_dir, student_dir, temperature=1.0,
                            responses_per_prompt=2, epsilon0=0.3))  # fmt: skip


def test_a_prompt_without_the_field_is_named_before_any_work(tmp_path, tiny_model_dir, student_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok"}, {"text": "no prompt"}])
    config = settings(tmp_path, bad, tiny_model_dir, student_dir)
    with pytest.raises(PromptError, match=r"bad.jsonl:2: no prompt field \(looked for messages"):
        synthesize(config)
    assert not (tmp_path / "out.jsonl").exists()


def test_teacher_mode_keeps_only_correct_answers(tmp_path, prompts):
    teacher = ScriptedEngine(
        steps={q: (f"So \\boxed{{{i % 2}}}", "eos") for i, q in enumerate(QUESTIONS)}
    )
    config = SynthesisConfig(
        method="teacher", prompts=(str(prompts),), teacher="t", out=str(tmp_path / "t.jsonl"),
        answer_field="answer", keep="correct", responses_per_prompt=1,
    )  # fmt: skip
    models = Models(LanguageModel(teacher, CharTokenizer()))
    summary = synthesize(config, models, render=lambda messages: messages[-1]["content"])
    kept = records(config.out)
    assert [r["id"] for r in kept] == ["q0", "q1"]  # gold i; answers i % 2: right for 0 and 1
    assert all(r["grade"]["correct"] and r["segments"][0]["source"] == "teacher" for r in kept)
    assert (summary["trajectories"], summary["kept"], summary["accuracy"]) == (5, 2, 0.4)
    assert kept[0]["prompt"] == QUESTIONS[0] and kept[0]["response"] == "So \\boxed{0}"


def test_shards_split_the_prompts_and_clashing_fields_are_refused(tmp_path, prompts):
    teacher = ScriptedEngine(steps={q: ("\\boxed{0}", "eos") for q in QUESTIONS})
    models = Models(LanguageModel(teacher, CharTokenizer()))
    seen = []
    for shard in range(2):
        config = SynthesisConfig(method="teacher", prompts=(str(prompts),), teacher="t",
                                 out=str(tmp_path / f"s{shard}.jsonl"), shard=(shard, 2),
                                 responses_per_prompt=1)  # fmt: skip
        synthesize(config, models, render=lambda messages: messages[-1]["content"])
        seen.append([r["prompt_index"] for r in records(config.out)])
    assert seen == [[0, 2, 4], [1, 3]]
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"question": "q", "steps": 3}])
    config = SynthesisConfig(method="teacher", prompts=(str(clash),), teacher="t",
                             out=str(tmp_path / "c.jsonl"))  # fmt: skip
    with pytest.raises(PromptError, match=r"clash.jsonl:1: .*\['steps'\] that the output"):
        synthesize(config, models, render=lambda messages: messages[-1]["content"])


def test_a_model_dir_that_does_not_load_is_named(tmp_path, prompts, tiny_model_dir):
    config = SynthesisConfig(method="teacher", prompts=(str(prompts),), out=str(tmp_path / "o"),
                             teacher=str(tmp_path / "no-model"), chat_template=False)  # fmt: skip
    with pytest.raises(ValueError, match=f"tokenizer dir {tmp_path / 'no-model'} does not exist"):
        synthesize(config)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    config = SynthesisConfig(method="teacher", prompts=(str(prompts),), out=str(tmp_path / "o2"),
                             teacher=str(broken), dtype="fp32")  # fmt: skip
    with pytest.raises(ValueError, match=f"cannot load a causal LM from {broken}"):
        synthesize(config)
