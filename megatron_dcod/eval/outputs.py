"""The output dir of an evaluation run, and resuming it.

    run_config.json     what defines the run (model, data fingerprint, prompt, sampling, ...)
    generations.jsonl   one graded generation a line, appended and flushed as they finish
    summary.json        metrics, settings, grader version, throughput (written at the end)
    report.md           the same as a markdown table

A run started again with the same --out skips the generations already in generations.jsonl; a
line cut short by a crash is dropped. A different model, data or decoding is refused rather than
mixed into the same results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_CONFIG = "run_config.json"
GENERATIONS = "generations.jsonl"
SUMMARY = "summary.json"
REPORT = "report.md"


class RunDir:
    """Reads what an earlier attempt completed and appends new generations."""

    def __init__(self, out: Path, identity: dict[str, Any]):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_identity(identity)
        self.completed = self._read_generations()
        self._log = open(self.out / GENERATIONS, "a", encoding="utf-8")

    def done(self, problem_index: int, sample: int) -> bool:
        return (problem_index, sample) in self.completed

    def append(self, records: list[dict]) -> None:
        """Write graded generations; durable once this returns."""
        for record in records:
            self._log.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.completed[(record["problem_index"], record["sample"])] = record
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        self._log.close()

    def write_summary(self, summary: dict, report: str) -> None:
        _write_atomically(self.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        _write_atomically(self.out / REPORT, report)

    def _check_identity(self, identity: dict[str, Any]) -> None:
        path = self.out / RUN_CONFIG
        identity = json.loads(json.dumps(identity))  # as it reads back (tuples -> lists, ...)
        if path.is_file():
            previous = json.loads(path.read_text())
            changed = [key for key in identity if previous.get(key) != identity[key]]
            if changed:
                details = "; ".join(f"{k}: {previous.get(k)!r} -> {identity[k]!r}" for k in changed)
                raise ValueError(
                    f"{self.out} holds a run with other settings ({details}); "
                    "use another --out, or the same settings to resume it"
                )
        else:
            _write_atomically(path, json.dumps(identity, indent=2) + "\n")

    def _read_generations(self) -> dict[tuple[int, int], dict]:
        path = self.out / GENERATIONS
        if not path.is_file():
            return {}
        completed, good_bytes = {}, 0
        with open(path, "rb") as lines:
            for line_number, line in enumerate(lines, start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    if line.endswith(b"\n"):
                        raise ValueError(f"{path}:{line_number}: malformed JSON") from None
                    break  # the last line, cut short by a crash: dropped below
                completed[(record["problem_index"], record["sample"])] = record
                good_bytes += len(line)
        os.truncate(path, good_bytes)
        return completed


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def markdown_report(summary: dict) -> str:
    """summary.json as a short markdown document with one table of results."""
    settings = summary["settings"]
    rows = [
        ("problems", summary["problems"]),
        ("samples per problem", summary["samples_per_problem"]),
    ]
    rows += [(name, f"{100 * value:.2f}") for name, value in summary["accuracy"].items()]
    rows += [
        ("truncation rate (%)", f"{100 * summary['truncation_rate']:.2f}"),
        ("mean response tokens", f"{summary['mean_response_tokens']:.1f}"),
        ("repetition rate (%)", f"{100 * summary['repetition_rate']:.2f}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"# {summary['benchmark']}: {summary['model']}\n\n"
        f"| metric | value |\n|---|---|\n{table}\n\n"
        f"Data: `{settings['data']}`. Backend: {summary['backend']}. "
        f"Sampling: temperature {settings['temperature']}, top-p {settings['top_p']}, "
        f"max new tokens {settings['max_new_tokens']}, seed {settings['seed']}. "
        f"Grader: {summary['grader']}.\n\n"
        f"Prompt (user turn): `{settings['prompt_template']!r}`; "
        f"system: `{settings['system_prompt']!r}`.\n"
    )
