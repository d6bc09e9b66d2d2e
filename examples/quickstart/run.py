#!/usr/bin/env python
"""The CPU quickstart (`make quickstart`): the whole pipeline on a synthetic task, SFT vs DCOD.

  1. tokenizer   byte-level BPE trained on the task's text (no downloads)
  2. teacher     a tiny Llama pre-trained briefly on teacher-style solutions (competent, imperfect)
  3. student     a smaller Llama pre-trained more briefly on student-style solutions
  4. traces      the teacher samples solutions of new problems with its log-probs and top-4
                 (the fields a vLLM teacher returns); correct ones are kept, as in rejection
                 sampling; held-out problems are written for evaluation
  5. preprocess  tools/preprocess_traces.py → a trace dataset
     MOTAB       tools/synthesize_traces.py --method motab: the student writes step by step,
                 the teacher monitors and takes over after a breach; preprocessed with the
                 teacher's log-probs (--score-with), trained with SFT as the MOTAB paper does
  6. import      tools/convert_checkpoint.py import-hf: the student → Megatron at TP=2
  7. train       python -m megatron_dcod.train on 2 CPU processes at TP=2, once with SFT
                 weights and once with DCOD weights, from the same student
  8. export      tools/convert_checkpoint.py export-hf: both students → HF dirs
  9. evaluate    tools/eval_math.py (custom JSONL) on the held-out problems: teacher, student
                 before, SFT, DCOD; then a side-by-side table and a PNG of the training curves

Every command is printed before it runs. Running the script again resumes: finished stages are
skipped (training resumes from its last checkpoint, evaluation from its generations).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

import arithmetic  # noqa: E402
import report  # noqa: E402

TRAIN_PROBLEMS, TRACE_PROBLEMS, HELDOUT_PROBLEMS = 4000, 1500, 200
MODEL_SIZES = {"teacher": (96, 3, 4, 400), "student": (64, 2, 4, 200)}
"""hidden size, layers, attention heads, pre-training steps (batch 32): the teacher is bigger
and trained longer than the student."""
TP = 2
METHODS = {
    "sft": ["--dcod-weighting", "sft"],
    "dcod": ["--dcod-weighting", "dcod"],
    "kl": ["--dcod-weighting", "sft", "--dcod-base-loss", "kl"],
    "dcod_kl": ["--dcod-weighting", "dcod", "--dcod-base-loss", "kl"],
    "todi": ["--dcod-weighting", "sft", "--dcod-base-loss", "todi"],
    "dcod_todi": ["--dcod-weighting", "dcod", "--dcod-base-loss", "todi"],
    "motab_sft": ["--dcod-weighting", "sft"],
    "motab_dcod": ["--dcod-weighting", "dcod"],
}
"""Students that can be trained from the same start (`--methods`): flags added to the training
command. The top-k losses use the teacher's stored top-4; `motab_*` train on the MOTAB traces."""
DEFAULT_METHODS = ("sft", "dcod", "motab_sft")
MOTAB_PROMPTS = 400
"""Trace problems the MOTAB traces are synthesized from (one trajectory each)."""
MOTAB_FLAGS = ["--responses-per-prompt", "1", "--step-stop", ", ", ".\\n", "--max-step-tokens",
               "96", "--max-tokens", "96", "--dtype", "fp32", "--answer-field", "answer"]  # fmt: skip
"""A step is a clause of the student's style ("plus 5 gives 13, ") or a line of the teacher's
("Step 1: 8 + 5 = 13.\n"), which the student writes one time in five."""


@dataclass(frozen=True)
class Paths:
    """Where each stage writes, under --out."""

    out: Path

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def traces(self) -> Path:
        """Prefix of the trace dataset."""
        return self.out / "data" / "traces"

    @property
    def motab(self) -> Path:
        """Prefix of the MOTAB trace dataset (records: motab.jsonl next to it)."""
        return self.out / "data" / "motab"

    def dataset(self, method: str) -> Path:
        return self.motab if method.startswith("motab") else self.traces

    @property
    def student_init(self) -> Path:
        """The initial student as a Megatron checkpoint (both methods start from it)."""
        return self.out / "checkpoints" / "student-init"

    def model(self, role: str) -> Path:
        """HF dir of the teacher, the initial student, or a trained method's student."""
        return self.out / role if role in MODEL_SIZES else self.out / "hf" / role

    def checkpoints(self, method: str) -> Path:
        return self.out / "checkpoints" / method


class Stages:
    """Numbered stage headings with the elapsed time; finished stages are announced skipped."""

    def __init__(self, total: int):
        self.total, self.number, self.started = total, 0, time.monotonic()

    def __call__(self, title: str, done: bool = False) -> bool:
        """Print the heading; True when the stage still has to run."""
        self.number += 1
        elapsed = time.monotonic() - self.started
        skipped = " (done, skipped)" if done else ""
        print(
            f"\n[{self.number}/{self.total}] {title}{skipped}   [{elapsed / 60:.1f} min]",
            flush=True,
        )
        return not done

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60


def run(command: list) -> None:
    print(f"\n$ {shlex.join(map(str, command))}", flush=True)
    subprocess.run(list(map(str, command)), check=True, cwd=ROOT)


def tool(name: str, *args) -> list:
    return [sys.executable, f"tools/{name}", *args]


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--train-iters", type=int, default=300, help="steps of each student")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated students to train, of {', '.join(METHODS)}",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    methods = {name: METHODS[name] for name in args.methods.split(",")}
    motab = any(method.startswith("motab") for method in methods)
    # tokenizer, models, traces, preprocess, (MOTAB: synthesize, preprocess), import, train and
    # export each method, evaluate
    stage_count = 1 + len(MODEL_SIZES) + 3 + 2 * motab + 2 * len(methods) + 1
    paths, stage = Paths(args.out.resolve()), Stages(total=stage_count)
    problems = task_problems()
    if stage("tokenizer: byte-level BPE trained on the task's text", paths.tokenizer.exists()):
        make_tokenizer(problems["train"], paths.tokenizer)
    for role in MODEL_SIZES:
        hidden, layers, _, steps = MODEL_SIZES[role]
        title = f"{role}: Llama {layers}×{hidden}, {steps} steps on {role}-style solutions"
        if stage(title, is_hf_dir(paths.model(role))):
            pretrain(role, problems["train"], paths)
    if stage(
        "teacher traces with log-probs; held-out problems", (paths.data / "heldout.jsonl").exists()
    ):
        write_traces(paths.model("teacher"), problems, paths.data)
    if stage("preprocess the traces", paths.traces.with_suffix(".meta.json").exists()):
        run(tool("preprocess_traces.py", "--input", paths.data / "teacher_traces.jsonl",
                 "--output-prefix", paths.traces, "--tokenizer", paths.tokenizer,
                 "--workers", "2", "--max-seq-length", "256"))  # fmt: skip
        run(tool("inspect_traces.py", paths.traces, "--index", "0", "--max-rows", "40"))
    if motab:
        synthesize_motab(paths, stage)
    if stage(f"import the student to Megatron at TP={TP}", paths.student_init.exists()):
        run(tool("convert_checkpoint.py", "import-hf", "--hf-dir", paths.model("student"),
                 "--out", paths.student_init, "--tensor-model-parallel-size", TP))  # fmt: skip
    for method, flags in methods.items():
        done = report.latest_iteration(paths.checkpoints(method)) == args.train_iters
        title = f"train the {report.label(method)} student, {args.train_iters} steps, TP={TP}"
        if stage(title, done):
            run(train_command(paths, method, args.train_iters) + flags)
    for method in methods:
        if stage(
            f"export the {report.label(method)} student to HF", is_hf_dir(paths.model(method))
        ):
            run(tool("convert_checkpoint.py", "export-hf", "--ckpt", paths.checkpoints(method),
                     "--hf-template", paths.model("student"),
                     "--out", paths.model(method)))  # fmt: skip
    stage(f"evaluate the {2 + len(methods)} models on the held-out problems")
    models = evaluate(paths, methods)
    notes = (motab_note(paths),) if motab else ()
    table = report.side_by_side(paths.out, models, methods, paths.out / "curves.png", notes)
    print("\n" + table)
    print(f"\nquickstart finished in {stage.minutes():.1f} min; everything is in {paths.out}")


def evaluate(paths: Paths, methods) -> dict[str, Path]:
    """tools/eval_math.py on the held-out problems (greedy); returns {table name: model dir}."""
    models = {"teacher": paths.model("teacher"), "student (before)": paths.model("student")}
    models |= {report.label(method): paths.model(method) for method in methods}
    for model_dir in models.values():
        run(tool("eval_math.py", "--model", model_dir, "--benchmark", "custom",
                 "--data", paths.data / "heldout.jsonl", "--prompt-template", "{problem}",
                 "--max-new-tokens", "96", "--batch-size", "50",
                 "--out", paths.out / "eval" / model_dir.name))  # fmt: skip
    return models


def synthesize_motab(paths: Paths, stage: Stages) -> None:
    """MOTAB traces from the first trace problems, then a dataset with the teacher's log-probs."""
    records = paths.motab.with_suffix(".jsonl")
    summary = Path(f"{records}.summary.json")
    done = summary.exists() and json.loads(summary.read_text())["complete"]
    if stage("MOTAB traces: student steps monitored by the teacher", done):
        prompts = paths.data / "motab_prompts.jsonl"
        problems = task_problems()["traces"][:MOTAB_PROMPTS]
        write_jsonl(prompts, [{"problem": p.text, "answer": str(p.answer)} for p in problems])
        run(tool("synthesize_traces.py", "--method", "motab", "--prompts", prompts,
                 "--teacher", paths.model("teacher"), "--student", paths.model("student"),
                 "--out", records, *MOTAB_FLAGS))  # fmt: skip
    if stage("preprocess the MOTAB traces, teacher log-probs from the teacher",
             paths.motab.with_suffix(".meta.json").exists()):  # fmt: skip
        run(tool("preprocess_traces.py", "--input", records, "--output-prefix", paths.motab,
                 "--tokenizer", paths.tokenizer, "--workers", "2", "--max-seq-length", "256",
                 "--score-with", paths.model("teacher")))  # fmt: skip


def motab_note(paths: Paths) -> str:
    summary = json.loads(Path(f"{paths.motab.with_suffix('.jsonl')}.summary.json").read_text())
    tokens = summary["generated_tokens_by_source"]
    teacher_share = tokens["teacher"] / max(1, tokens["teacher"] + tokens["student"])
    return (
        f"MOTAB traces: {summary['trajectories']} trajectories, breach rate "
        f"{summary['breach_rate']:.0%} (mean t* {summary['mean_t_star'] or 0:.1f}), "
        f"{teacher_share:.0%} of the generated tokens the teacher's, final answer right in "
        f"{summary['accuracy']:.0%}; the MOTAB row's val loss is on held-out MOTAB traces."
    )


def make_tokenizer(problems: list[arithmetic.Problem], out_dir: Path) -> None:
    from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

    texts = [
        "\n".join((p.text, arithmetic.teacher_solution(p), arithmetic.student_solution(p)))
        for p in problems
    ]
    train_tiny_tokenizer(texts, out_dir)


def pretrain(role: str, problems: list[arithmetic.Problem], paths: Paths) -> None:
    """A fresh tiny Llama of `role`'s size trained on `role`'s solutions, saved as an HF dir."""
    pretrain_model(paths.model(role), paths.tokenizer, role, problems, *MODEL_SIZES[role])


def pretrain_model(directory: Path, tokenizer_dir: Path, role: str, problems, *size) -> None:
    """`size` = hidden, layers, heads, steps (batch 32) of a Llama trained on `role`'s
    solutions of `problems` (examples/lab/ makes students of other lengths with it)."""
    import tiny_models
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, layers, heads, steps = size
    model = tiny_models.make_llama(tokenizer, hidden, layers, heads, seed=len(role))
    examples = tiny_models.chat_examples(tokenizer_dir, pretraining_pairs(role, problems))
    losses = tiny_models.pretrain(model, examples, steps, batch_size=32, lr=3e-3, desc=role)
    tiny_models.save(model, tokenizer, directory)
    (directory / "pretrain_losses.json").write_text(json.dumps(losses))


def task_problems(chain: tuple[int, int] = arithmetic.SHORT_CHAINS) -> dict[str, list]:
    """Disjoint problem sets of `chain` operations: pre-training, teacher traces, held-out."""
    train = arithmetic.problems(TRAIN_PROBLEMS, seed=1, chain=chain)
    seen = frozenset(problem.text for problem in train)
    heldout = arithmetic.problems(HELDOUT_PROBLEMS, seed=3, exclude=seen, chain=chain)
    seen |= {problem.text for problem in heldout}
    traces = arithmetic.problems(TRACE_PROBLEMS, seed=2, exclude=seen, chain=chain)
    return {"train": train, "traces": traces, "heldout": heldout}


def pretraining_pairs(role: str, problems: list[arithmetic.Problem]) -> list[tuple[str, str]]:
    """(prompt, solution) pairs. The student writes its own style, with one solution in five in
    the teacher's style: like a real student model, it gives the teacher's tokens some
    probability, but its distribution is not the teacher's."""
    if role == "teacher":
        return [(p.text, arithmetic.teacher_solution(p)) for p in problems]
    return [
        (p.text, (arithmetic.teacher_solution if i % 5 == 0 else arithmetic.student_solution)(p))
        for i, p in enumerate(problems)
    ]


def write_traces(teacher_dir: Path, problems: dict, data: Path, max_new_tokens: int = 96) -> None:
    """Stage 4: teacher samples with log-probs (correct and canonically tokenized ones kept)
    → teacher_traces.jsonl; the held-out problems → heldout.jsonl (eval_math.py's custom)."""
    import tiny_models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_dcod.eval.grading import last_boxed

    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = [problem.text for problem in problems["traces"]]
    samples = tiny_models.sample_with_logprobs(
        model, tokenizer, prompts, max_new_tokens, topk=4, seed=0
    )
    canonical = tiny_models.canonically_tokenized(teacher_dir, samples)
    kept, wrong, non_canonical = [], 0, 0
    for problem, sample, is_canonical in zip(problems["traces"], samples, canonical):
        if last_boxed(sample["response"]) != str(problem.answer):
            wrong += 1
        elif not is_canonical:
            non_canonical += 1  # re-tokenizing the text would not give the sampled ids
        else:
            kept.append({"id": len(kept), **sample, "answer": str(problem.answer)})
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "teacher_traces.jsonl", kept)
    heldout = [{"problem": p.text, "answer": str(p.answer)} for p in problems["heldout"]]
    write_jsonl(data / "heldout.jsonl", heldout)
    print(
        f"teacher: {len(samples)} samples at temperature 1, {wrong} wrong, {non_canonical} not "
        f"canonically tokenized, {len(kept)} kept → {data / 'teacher_traces.jsonl'}"
    )


def write_jsonl(path: Path, records: list[dict]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    temporary.replace(path)


def train_command(paths: Paths, method: str, iters: int) -> list:
    """TP=2 on 2 CPU processes: 1 data-parallel rank, global batch 8 = micro 4 × 2 accumulation,
    packed 256-token sequences (~3 traces each). The run starts from the imported student
    (`--pretrained-checkpoint`) and resumes from `--save` when restarted."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "-m", "megatron_dcod.train",
        "--hf-config", paths.model("student"), "--dcod-tokenizer", paths.tokenizer,
        "--data-path", paths.dataset(method), "--split", "95,5,0", "--tensor-model-parallel-size", TP,
        "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", iters, "--lr", "1e-3", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "10", "--min-lr", "1e-4", "--weight-decay", "0.01",
        "--clip-grad", "1.0", "--seed", "1234",
        "--log-interval", "10", "--eval-interval", "100", "--eval-iters", "4",
        "--pretrained-checkpoint", paths.student_init,
        "--load", paths.checkpoints(method), "--save", paths.checkpoints(method),
        "--save-interval", "100", "--ckpt-format", "torch_dist",
        "--tensorboard-dir", paths.checkpoints(method) / "tensorboard",
    ]  # fmt: skip


if __name__ == "__main__":
    main()
