"""Flags of tools/synthesize_traces.py, turned into a SynthesisConfig once."""

from __future__ import annotations

import argparse

from megatron_dcod.synthesis.config import METHODS, SynthesisConfig


def add_synthesis_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = SynthesisConfig(method="teacher", prompts=(), teacher="", out="")
    data = parser.add_argument_group("data")
    data.add_argument("--method", required=True, choices=METHODS)
    data.add_argument("--prompts", nargs="+", required=True, metavar="FILE")
    data.add_argument("--teacher", required=True, metavar="DIR")
    data.add_argument("--student", metavar="DIR")
    data.add_argument("--out", required=True, metavar="FILE.jsonl")
    data.add_argument("--prompt-field", help="default: the first of messages, prompt, "
                      "problem, question, input that a record has")  # fmt: skip
    data.add_argument("--answer-field", help="gold answer field: grade every response")
    data.add_argument("--keep", choices=("all", "correct"), default=defaults.keep)
    data.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    data.add_argument("--system-prompt")
    data.add_argument("--split", default=defaults.split)
    data.add_argument("--shard", default="0/1", metavar="I/N")
    method = parser.add_argument_group("sampling and the monitor")
    for name in ("responses_per_prompt", "max_step_tokens", "max_tokens", "entropy_topk"):
        method.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name)
        )
    for name in ("temperature", "top_p", "epsilon0", "theta", "gamma"):
        method.add_argument(
            "--" + name.replace("_", "-"), type=float, default=getattr(defaults, name)
        )
    method.add_argument("--step-stop", nargs="+", default=list(defaults.step_stop), type=unescaped)
    method.add_argument("--revise-text", default=defaults.revise_text, type=unescaped)
    method.add_argument("--seed", type=int, default=defaults.seed)
    engines = parser.add_argument_group("engines")
    engines.add_argument("--backend", choices=("auto", "hf", "vllm"), default=defaults.backend)
    engines.add_argument("--device", default=defaults.device)
    engines.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                         help="default: fp32 for the HF backend on CPU, else bf16")  # fmt: skip
    for name in ("batch_size", "batch_tokens", "max_live_trajectories"):
        engines.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name)
        )
    for model in ("teacher", "student"):
        engines.add_argument(f"--{model}-tensor-parallel-size", type=int, default=1)
        engines.add_argument(f"--{model}-gpu-memory-utilization", type=float)
    return parser


def synthesis_config_from_args(args: argparse.Namespace) -> SynthesisConfig:
    values = dict(vars(args))
    values["prompts"], values["step_stop"] = tuple(values["prompts"]), tuple(values["step_stop"])
    values["shard"] = _shard(values["shard"])
    return SynthesisConfig(**values)


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N (e.g. 3/8), got {text!r}") from None
    return index, count


def unescaped(text: str) -> str:
    r"""Shell-friendly escapes: --step-stop '.\n\n' means a period and two newlines."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
