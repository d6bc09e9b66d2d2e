"""The method lab's spec: one student, one teacher, datasets, methods × seeds, evaluations.

A spec is a JSON or YAML file (docs/lab.md has a full example):

    name: toy-cold-short
    student: student            # HF dir every method starts from
    teacher: teacher            # HF dir: the drift metric's reference
    datasets: {teacher: data/traces, motab: data/motab}
    seeds: [1, 2, 3]
    train: [--seq-length, "256", --micro-batch-size, "4", ...]    # every run's train_hf flags
    methods:
      sft: {flags: [--dcod-weighting, sft]}
      motab_dcod: {data: motab, flags: [--dcod-weighting, dcod], label: MOTAB + DCOD}
    evals:
      heldout: {data: heldout.jsonl, flags: [--prompt-template, "{problem}"]}
    drift: {data: heldout.jsonl, flags: [--num-prompts, "32"]}

Relative paths are relative to the spec's directory. Errors name the spec file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DATASET = "teacher"
"""The dataset a method trains on unless it names another: the plain teacher traces."""


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison."""

    name: str
    """Row key and run-directory name (letters, digits, `_`, `-`, `.`)."""
    data: str
    """Key of `LabSpec.datasets` the method trains on."""
    flags: tuple[str, ...]
    """Flags added to the common training flags (`--dcod-*`, or any train_hf flag)."""
    label: str
    """Name in tables and plots (default: `name`)."""


@dataclass(frozen=True)
class EvalSpec:
    """One benchmark every trained student is graded on with tools/eval_math.py."""

    name: str
    data: Path
    benchmark: str
    """eval_math's --benchmark (default custom: problem/answer records)."""
    flags: tuple[str, ...]
    """More eval_math flags (prompt template, max new tokens, limit, ...)."""


@dataclass(frozen=True)
class DriftSpec:
    """tools/measure_drift.py on every trained student against the teacher."""

    data: Path
    flags: tuple[str, ...]


@dataclass(frozen=True)
class LabSpec:
    """A whole comparison: methods × seeds from one student, graded the same way."""

    path: Path
    """The spec file."""
    name: str
    student: Path
    teacher: Path
    datasets: dict[str, Path]
    """Trace-dataset prefixes by key; `teacher` is the default training set."""
    seeds: tuple[int, ...]
    train_flags: tuple[str, ...]
    """python -m megatron_dcod.train_hf flags every run gets (batch, schedule, lr, logging)."""
    methods: tuple[MethodSpec, ...]
    evals: tuple[EvalSpec, ...]
    drift: DriftSpec | None
    initial_student_row: bool = True
    """Also evaluate the student before training (the `student (before)` row)."""


def load_spec(path: str | Path) -> LabSpec:
    """Read and check a spec; SpecError names what is wrong and where."""
    path = Path(path)
    raw = _read(path)
    root = path.resolve().parent

    def where(key: str) -> str:
        return f"{path}: {key}"

    def required(mapping: dict, key: str, context: str) -> Any:
        if key not in mapping:
            raise SpecError(f"{where(context)}: missing `{key}`")
        return mapping[key]

    datasets = {key: _path(root, value) for key, value in _mapping(raw, "datasets", where).items()}
    seeds = required(raw, "seeds", "seeds")
    integers = isinstance(seeds, list) and all(type(seed) is int for seed in seeds)
    if not (integers and seeds and len(set(seeds)) == len(seeds)):
        raise SpecError(f"{where('seeds')}: a non-empty list of distinct integers, got {seeds!r}")
    methods = tuple(
        _method(name, body, datasets, where)
        for name, body in _mapping(raw, "methods", where).items()
    )
    evals = tuple(
        EvalSpec(
            name=_name(name, where("evals")),
            data=_path(
                root, required(_entry(body, where(f"evals.{name}")), "data", f"evals.{name}")
            ),
            benchmark=str(body.get("benchmark", "custom")),
            flags=_flags(body.get("flags", []), where(f"evals.{name}.flags")),
        )
        for name, body in _mapping(raw, "evals", where).items()
    )
    drift_body = raw.get("drift")
    drift = None
    if drift_body is not None:
        _entry(drift_body, where("drift"))
        drift = DriftSpec(
            data=_path(root, required(drift_body, "data", "drift")),
            flags=_flags(drift_body.get("flags", []), where("drift.flags")),
        )
    spec = LabSpec(
        path=path,
        name=str(raw.get("name", path.stem)),
        student=_path(root, required(raw, "student", "student")),
        teacher=_path(root, required(raw, "teacher", "teacher")),
        datasets=datasets,
        seeds=tuple(seeds),
        train_flags=_flags(raw.get("train", []), where("train")),
        methods=methods,
        evals=evals,
        drift=drift,
        initial_student_row=bool(raw.get("initial_student_row", True)),
    )
    _check_inputs(spec)
    return spec


def _read(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    text = path.read_text()
    yaml_file = path.suffix in (".yaml", ".yml")
    if yaml_file:
        import yaml  # transformers needs PyYAML, so it is installed
    try:
        if yaml_file:
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as error:  # json and yaml raise their own error types
        raise SpecError(f"{path}: not valid {path.suffix[1:].upper()}: {error}") from error
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping")
    return raw


def _mapping(raw: dict, key: str, where) -> dict:
    value = raw.get(key)
    if not isinstance(value, dict) or not value:
        raise SpecError(f"{where(key)}: a non-empty mapping of name → entry")
    return value


def _entry(body: Any, where: str) -> dict:
    if not isinstance(body, dict):
        raise SpecError(f"{where}: a mapping, got {type(body).__name__}")
    return body


def _method(name: str, body: Any, datasets: dict, where) -> MethodSpec:
    body = _entry(body or {}, where(f"methods.{name}"))
    data = str(body.get("data", DEFAULT_DATASET))
    if data not in datasets:
        raise SpecError(
            f"{where(f'methods.{name}.data')}: unknown dataset {data!r}; "
            f"`datasets` has {', '.join(datasets)}"
        )
    return MethodSpec(
        name=_name(name, where("methods")),
        data=data,
        flags=_flags(body.get("flags", []), where(f"methods.{name}.flags")),
        label=str(body.get("label", name)),
    )


def _name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
        raise SpecError(f"{where}: {name!r} is not a usable name (letters, digits, _ - .)")
    return name


def _flags(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise SpecError(f"{where}: a list of command-line words")
    return tuple(str(v) for v in value)


def _path(root: Path, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else root / path


def _check_inputs(spec: LabSpec) -> None:
    """The models, datasets and eval files exist (before any run starts)."""
    from megatron_dcod.data.trace_format import meta_path

    for role in ("student", "teacher"):
        if not (getattr(spec, role) / "config.json").is_file():
            raise SpecError(f"{spec.path}: {role}: {getattr(spec, role)} is not an HF model dir")
    used = {method.data for method in spec.methods} | (
        {DEFAULT_DATASET} if DEFAULT_DATASET in spec.datasets else set()
    )  # the default dataset: the weights by position and teacher CE of every run
    for key in sorted(used):
        if not meta_path(spec.datasets[key]).is_file():
            raise SpecError(
                f"{spec.path}: datasets.{key}: no trace dataset at {spec.datasets[key]} "
                f"({meta_path(spec.datasets[key]).name} missing)"
            )
    files = [(f"evals.{e.name}.data", e.data) for e in spec.evals]
    files += [("drift.data", spec.drift.data)] if spec.drift else []
    for key, file in files:
        if not file.exists():
            raise SpecError(f"{spec.path}: {key}: {file} does not exist")
