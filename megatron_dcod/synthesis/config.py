"""Settings of tools/synthesize_traces.py, turned from its flags once at start-up."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

METHODS = ("teacher", "motab", "skd")
PROMPT_FIELDS = ("messages", "prompt", "problem", "question", "input")
"""Fields tried in order when --prompt-field is not given."""


@dataclass(frozen=True)
class SynthesisConfig:
    """One synthesis run (docs/synthesis.md describes the methods and their knobs)."""

    method: str
    """teacher: the teacher answers; motab: monitored student steps with backtracking; skd."""
    prompts: tuple[str, ...]
    """Prompt files (JSONL / JSON / Parquet / HF dataset dirs), read in order."""
    teacher: str
    """HF model dir of the teacher."""
    out: str
    """Output JSONL; `{out}.summary.json` and `{out}.done` sit next to it."""
    student: str | None = None
    """HF model dir of the student (motab, skd)."""
    prompt_field: str | None = None
    """Field holding the prompt (a string, or a messages list); None: the first of
    PROMPT_FIELDS that a record has."""
    answer_field: str | None = None
    """Field holding the gold answer; responses are then graded with the math grader."""
    keep: str = "all"
    """all, or correct: only responses whose final answer is right (needs answer_field)."""
    chat_template: bool = True
    """Render prompts with the chat template (the student's, else the teacher's); False: the
    raw prompt text, as the MOTAB authors ran it."""
    system_prompt: str | None = None
    """System message put before each text prompt (chat template only)."""
    split: str = "train"
    """Split read from HF dataset dirs."""
    responses_per_prompt: int = 5
    """Trajectories per prompt."""
    temperature: float = 0.6
    """Sampling temperature of every generation (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (the authors set none: 1.0)."""
    step_stop: tuple[str, ...] = (".\n\n",)
    """A step ends after any of these strings (motab, skd); it stays in the step's text."""
    max_step_tokens: int = 8192
    """Most tokens one step may take."""
    max_tokens: int = 32768
    """Token budget of a response (generated tokens; the prompt does not count)."""
    epsilon0: float = 0.2
    """ε₀ of the breach boundary ε = ε₀·exp(−θH) (Eq. 7)."""
    theta: float = 1.0
    """θ of the breach boundary: how much teacher entropy lowers it."""
    entropy_topk: int = 20
    """Top-k of the teacher's next-token distribution that the entropy H is taken over."""
    gamma: float = 0.9
    """SKD: keep a student step when V_T > γ · the student's own geometric-mean probability."""
    revise_text: str = "\n\nHowever,\n\n"
    """Connector between the student's steps and the teacher's continuation (Eq. 11)."""
    seed: int = 0
    """Base seed; every trajectory draws from its own stream derived from it."""
    shard: tuple[int, int] = (0, 1)
    """(I, N): this run does the prompts whose index modulo N is I."""
    backend: str = "auto"
    """hf, vllm, or auto (vLLM when installed and a GPU is visible)."""
    device: str = "cpu"
    """Torch device of the HF backend."""
    dtype: str | None = None
    """Model dtype: fp32, bf16 or fp16; None: fp32 for the HF backend on CPU, else bf16."""
    batch_size: int = 16
    """HF backend: sequences decoded together."""
    batch_tokens: int = 16384
    """HF backend: padded tokens per scoring forward pass."""
    max_live_trajectories: int = 64
    """Trajectories advanced together each round (vLLM: set it high, e.g. 1024)."""
    teacher_tensor_parallel_size: int = 1
    """vLLM: GPUs of the teacher."""
    student_tensor_parallel_size: int = 1
    """vLLM: GPUs of the student."""
    teacher_gpu_memory_utilization: float | None = None
    """vLLM: fraction of GPU memory for the teacher (set both when they share GPUs)."""
    student_gpu_memory_utilization: float | None = None
    """vLLM: fraction of GPU memory for the student."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "teacher" and not self.student:
            raise ValueError(f"--method {self.method} needs --student")
        if self.keep not in ("all", "correct"):
            raise ValueError(f"--keep must be all or correct, got {self.keep!r}")
        if self.keep == "correct" and not self.answer_field:
            raise ValueError("--keep correct needs --answer-field to grade the responses")
        if self.system_prompt and not self.chat_template:
            raise ValueError("--system-prompt needs the chat template")
        index, count = self.shard
        if not 0 <= index < count:
            raise ValueError(f"--shard {index}/{count}: need 0 <= I < N")
        for name in ("responses_per_prompt", "max_step_tokens", "max_tokens", "entropy_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.method != "teacher" and (not self.step_stop or not all(self.step_stop)):
            raise ValueError("--step-stop needs non-empty strings")

    def output_settings(self) -> dict:
        """The settings the output depends on: a rerun at the same --out must repeat them."""
        ignored = {"out", "batch_size", "batch_tokens", "max_live_trajectories"}
        ignored |= {"teacher_gpu_memory_utilization", "student_gpu_memory_utilization"}
        settings = {k: v for k, v in asdict(self).items() if k not in ignored}
        return json.loads(json.dumps(settings))  # tuples as lists, as a summary file holds them
