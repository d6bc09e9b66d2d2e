"""The output of a synthesis run: records, the list of finished prompts, and the summary.

`{out}` holds one JSON line per kept trajectory. `{out}.done` gets one line per finished
prompt, written after that prompt's records are on disk, with the prompt's counts: it is what
a rerun trusts. On a rerun, records of prompts missing from `.done` (a run killed while
writing them) and a cut last line are dropped, and the run goes on with the other prompts.
`{out}.summary.json` holds the settings from the start (a rerun with other settings is
refused, naming the field) and the totals once every prompt is done (`complete: true`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_dcod.synthesis.config import SynthesisConfig

COUNTS = ("trajectories", "kept", "failed", "breaches", "graded", "correct", "t_star_sum")
COUNTS += ("tokens_student", "tokens_teacher", "steps", "value_sum", "failed_scores")


class SynthesisOutput:
    """Appends finished prompts to `{out}` and resumes from what an earlier run left."""

    def __init__(self, config: SynthesisConfig, run_info: dict[str, Any]):
        self.path = Path(config.out)
        self.done_path = Path(f"{config.out}.done")
        self.summary_path = Path(f"{config.out}.summary.json")
        self.settings = config.output_settings()
        self.run_info = run_info
        self.totals: Counter = Counter()
        self.done: set[int] = set()

    def resume(self) -> set[int]:
        """Check the settings of an earlier run, keep its finished prompts; their indices."""
        if self.summary_path.exists():
            earlier = json.loads(self.summary_path.read_text())["settings"]
            for name in sorted(set(earlier) | set(self.settings)):
                if earlier.get(name) != self.settings.get(name):
                    raise ValueError(
                        f"{self.path} was written with {name}={earlier.get(name)!r}, this run "
                        f"has {name}={self.settings.get(name)!r}: use another --out"
                    )
        elif self.path.exists() or self.done_path.exists():
            raise ValueError(f"{self.path} exists but has no {self.summary_path.name}: not ours")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for entry in _complete_lines(self.done_path):
            self.done.add(entry["prompt_index"])
            self.totals.update({name: entry.get(name, 0) for name in COUNTS})
        _rewrite(self.done_path, [_json_line(e) for e in _complete_lines(self.done_path)])
        kept = [_json_line(r) for r in _complete_lines(self.path) if r["prompt_index"] in self.done]
        _rewrite(self.path, kept)
        self.write_summary(complete=False)
        return set(self.done)

    def add_prompt(self, prompt_index: int, records: list[dict], counts: dict[str, float]) -> None:
        """Append one finished prompt's records, then mark it done."""
        with open(self.path, "a", encoding="utf-8") as out:
            out.writelines(_json_line(record) + "\n" for record in records)
            out.flush()
            os.fsync(out.fileno())
        with open(self.done_path, "a") as done:
            done.write(_json_line({"prompt_index": prompt_index, **counts}) + "\n")
            done.flush()
        self.done.add(prompt_index)
        self.totals.update(counts)

    def write_summary(self, complete: bool, extra: dict[str, Any] | None = None) -> dict:
        totals = self.totals
        trajectories = totals["trajectories"]
        summary = {
            "complete": complete,
            "prompts_done": len(self.done),
            **{name: totals[name] for name in ("trajectories", "kept", "failed", "breaches")},
            "failed_scores": totals["failed_scores"],
            "breach_rate": totals["breaches"] / trajectories if trajectories else None,
            "mean_t_star": (
                totals["t_star_sum"] / totals["breaches"] if totals["breaches"] else None
            ),
            "mean_value": totals["value_sum"] / totals["steps"] if totals["steps"] else None,
            "accuracy": totals["correct"] / totals["graded"] if totals["graded"] else None,
            "generated_tokens_by_source": {
                source: totals[f"tokens_{source}"] for source in ("student", "teacher")
            },
            **(extra or {}),
            "settings": self.settings,
            **self.run_info,
        }
        temporary = self.summary_path.with_name(self.summary_path.name + ".tmp")
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
        temporary.replace(self.summary_path)
        return summary


def _complete_lines(path: Path) -> list[dict]:
    """The JSON lines of a file; a last line without its newline (a killed write) is dropped."""
    if not path.exists():
        return []
    *complete, _cut = path.read_bytes().split(b"\n")  # _cut is b"" after a whole last line
    entries = []
    for number, line in enumerate(complete, start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error}); damaged") from error
    return entries


def _json_line(record: dict) -> str:
    """The one serialization of output lines (a rewritten file must equal the original)."""
    return json.dumps(record, ensure_ascii=False)


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace a file by these lines, atomically."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    temporary.replace(path)
