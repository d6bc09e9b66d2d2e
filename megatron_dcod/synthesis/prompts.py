"""Prompt records: reading them, finding the prompt and the gold answer, rendering the text the
models continue, and the prompt part of the output records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from megatron_dcod.data.records import RecordLocation, iter_raw_records, loads_record
from megatron_dcod.eval.benchmarks import answer_text
from megatron_dcod.synthesis.config import PROMPT_FIELDS, SynthesisConfig

OUTPUT_FIELDS = {"prompt", "response", "system", "messages", "segments", "method", "steps"}
OUTPUT_FIELDS |= {"prompt_index", "response_index", "breach", "t_star", "grade", "teacher_failed"}
"""Fields synthesis writes; a prompt record may hold the one its prompt comes from."""


class PromptError(ValueError):
    """A prompt record that cannot be used; the message names its file and line."""


@dataclass
class Prompt:
    """One prompt, ready for the step loops."""

    index: int
    """0-based position over all --prompts files: the key of its outputs."""
    location: str
    """file:line (or file record N), for messages."""
    record: dict[str, Any]
    """The record as read; its fields are copied into every output record."""
    field: str
    """The field the prompt came from."""
    messages: list[dict[str, str]]
    """The conversation before the response (a text prompt becomes one user turn)."""
    text: str
    """What the models continue: the rendered chat, or the raw prompt text."""
    gold: str | None
    """Gold answer text when --answer-field is given."""


def iter_prompts(config: SynthesisConfig, render) -> Iterator[Prompt]:
    """Every prompt of this shard, in file order; `render(messages) -> text`."""
    index = 0
    for path in config.prompts:
        for location, payload in iter_raw_records(path, config.split):
            if index % config.shard[1] == config.shard[0]:
                yield _prompt(config, render, index, location, payload)
            index += 1


def _prompt(config, render, index: int, location: RecordLocation, payload: Any) -> Prompt:
    record = loads_record(payload, location) if isinstance(payload, (bytes, str)) else payload
    if not isinstance(record, dict):
        raise PromptError(f"{location}: a prompt record must be a JSON object")
    names = (config.prompt_field,) if config.prompt_field else PROMPT_FIELDS
    field = next((name for name in names if record.get(name) not in (None, "", [])), None)
    if field is None:
        raise PromptError(f"{location}: no prompt field (looked for {', '.join(names)})")
    messages = _messages(record[field], field, location, config)
    clashes = sorted((set(record) - {field}) & OUTPUT_FIELDS)
    if clashes:
        raise PromptError(
            f"{location}: the prompt record has field(s) {clashes} that the output records use; "
            "rename them"
        )
    if config.chat_template:
        text = render(messages)
    elif isinstance(record[field], str):
        text = record[field]
    else:
        raise PromptError(f"{location}: --no-chat-template needs a text prompt, '{field}' is not")
    gold = None
    if config.answer_field:
        try:
            gold = answer_text(record.get(config.answer_field))
        except ValueError:
            raise PromptError(f"{location}: no answer in field '{config.answer_field}'") from None
    return Prompt(index, str(location), record, field, messages, text, gold)


def _messages(value: Any, field: str, location, config: SynthesisConfig) -> list[dict]:
    if isinstance(value, str):
        system = (
            [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
        )
        return system + [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value
    ):
        raise PromptError(f"{location}: '{field}' must be a string or a list of {{role, content}}")
    if any(message["role"] == "assistant" for message in value):
        raise PromptError(
            f"{location}: '{field}' has an assistant turn; prompts must end before the first "
            "answer (the output is one response, whose segments preprocessing aligns)"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_fields(prompt: Prompt, response: str, generated: dict[str, Any]) -> dict[str, Any]:
    """The output record: the prompt's own fields, the conversation for preprocessing, then the
    synthesis fields."""
    ours: dict[str, Any] = {}
    if prompt.field == "messages" or not isinstance(prompt.record[prompt.field], str):
        ours["messages"] = prompt.messages + [{"role": "assistant", "content": response}]
    else:
        ours["prompt"], ours["response"] = prompt.record[prompt.field], response
        if len(prompt.messages) > 1:
            ours["system"] = prompt.messages[0]["content"]
    ours.update(generated)
    return dict(prompt.record) | ours  # clashes were refused when the prompt was read
