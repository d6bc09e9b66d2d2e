"""Render conversations with the student's chat template and mark the supervised tokens.

Loss mask rule: every assistant turn is supervised, from the first character after the
template's generation prompt to the end of what the template writes for that turn (the
end-of-turn token included), less trailing whitespace the model never generates. A token is
supervised when its first character lies inside such a span; token 0 never is.

Source rule (records with `segments`, see data/sources.py): a supervised token takes the source
of the segment holding its first character (the start offset the tokenizer reports); one whose
first character lies outside the response content, i.e. template text of the turn, takes the
source of the nearest segment: the first before the content, the last after it (the
end-of-turn token). Unsupervised tokens get 0.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megatron_dcod.data.trace_format import TokenizerFingerprint

# Used when the tokenizer ships no chat template. Each turn is "<|role|>\n" + content + EOS + "\n",
# and the generation prompt is "<|assistant|>\n".
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Messages = Sequence[dict[str, str]]
SegmentMarks = list[tuple[int, int, int]]  # [start, end) characters in the text, source code
Rendered = tuple[str, list[tuple[int, int]], SegmentMarks | None]
"""The text, the [start, end) spans of its assistant turns, the marks of the response segments."""
Tokenized = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""tokens [T] int32, loss_mask [T] uint8, source [T] uint8 (None without segments)."""


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render in a way we can mask."""


def load_tokenizer(tokenizer_dir: str | Path) -> Any:
    """Load a local HF fast tokenizer, with a clear error naming the dir when that fails."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise ValueError(f"tokenizer dir {path} does not exist or is not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # transformers raises many types for unreadable dirs
        raise ValueError(f"cannot load a tokenizer from {path}: {error}") from error
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is needed for offsets")
    return tokenizer


class ChatTokenizer:
    """The student tokenizer plus the chat template traces are rendered with."""

    def __init__(self, tokenizer_dir: str | Path):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.chat_template = self.tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
        if self.tokenizer.chat_template is None and self.tokenizer.eos_token is None:
            raise ValueError(
                f"{tokenizer_dir}: the tokenizer has neither a chat template nor an EOS token"
            )

    @cached_property
    def fingerprint(self) -> TokenizerFingerprint:
        """Computed when first asked for (hashing the vocabulary is not free)."""
        return TokenizerFingerprint.of(self.tokenizer, self.chat_template)

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def render_with_spans(
        self, messages: Messages, segments: Sequence[tuple[int, str]] | None = None
    ) -> Rendered:
        """The rendered conversation, the [start, end) character spans of assistant turns and,
        given the (source, text) `segments` of the last assistant turn's content, their marks."""
        text = self.render(messages)
        spans, turn, content = [], (0, 0), ""  # turn: [start, end) of the last assistant turn
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ChatTemplateError(
                    f"the chat template does not render turn {index} as a prefix of the whole "
                    "conversation, so its tokens cannot be located"
                )
            end = len(through.rstrip())
            if end > len(before):
                spans.append((len(before), end))
            turn, content = (len(before), len(through)), message["content"]
        marks = None if segments is None else _segment_marks(text, turn, content, segments)
        return text, spans, marks

    def encode(self, conversations: Sequence[Messages]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize conversations; per conversation (tokens [T] int32, loss_mask [T] uint8)."""
        rendered = [self.render_with_spans(messages) for messages in conversations]
        tokenized = tokenize_rendered(self.tokenizer.backend_tokenizer, rendered)
        return [(tokens, loss_mask) for tokens, loss_mask, _ in tokenized]


def _segment_marks(
    text: str, turn: tuple[int, int], content: str, segments: Sequence[tuple[int, str]]
) -> SegmentMarks:
    """[start, end) of each non-empty segment in the rendered text, with its source: the content
    is looked up in its turn (right after the generation prompt for most templates)."""
    start = turn[0] if text.startswith(content, turn[0]) else text.find(content, *turn)
    if start < 0:
        raise ChatTemplateError(
            "the chat template does not render the response verbatim, so its segments cannot "
            "be placed"
        )
    marks = []
    for source, piece in segments:
        if piece:
            marks.append((start, start + len(piece), source))
            start += len(piece)
    return marks


def tokenize_rendered(backend_tokenizer: Any, rendered: Sequence[Rendered]) -> list[Tokenized]:
    """Tokenize rendered conversations in one batched call of the Rust tokenizer and mark the
    tokens whose first character lies in a supervised span (only span ends are looked up), and
    their sources where segments are marked (see the module doc).

    Needs nothing but a `tokenizers.Tokenizer`, so tokenizer workers start without transformers.
    """
    encodings = backend_tokenizer.encode_batch(
        [text for text, _, _ in rendered], add_special_tokens=False  # templates write BOS/EOS
    )
    results = []
    for (_, spans, marks), encoding in zip(rendered, encodings):
        tokens = np.asarray(encoding.ids, dtype=np.int32)  # [T]
        loss_mask = np.zeros(len(tokens), dtype=np.uint8)  # [T]
        for start, end in spans:
            first, last = _tokens_starting_in(encoding, start, end)
            loss_mask[first : last + 1] = 1
        loss_mask[:1] = 0  # token 0 is never a target
        source = None if marks is None else _token_sources(encoding, loss_mask, marks)
        results.append((tokens, loss_mask, source))
    return results


def _token_sources(encoding: Any, loss_mask: np.ndarray, marks: SegmentMarks) -> np.ndarray:
    """[T] uint8: the source of the segment holding each supervised token's first character
    (before the first segment: the first; after the last: the last), 0 off the loss mask."""
    first_chars = np.fromiter((start for start, _ in encoding.offsets), np.int64)  # [T]
    starts = np.asarray([start for start, _, _ in marks], dtype=np.int64)  # [S], ascending
    codes = np.asarray([code for _, _, code in marks], dtype=np.uint8)  # [S]
    segment = np.searchsorted(starts, first_chars, side="right") - 1  # [T] last one started
    return np.where(loss_mask > 0, codes[np.maximum(segment, 0)], 0).astype(np.uint8)


def _tokens_starting_in(encoding: Any, start: int, end: int) -> tuple[int, int]:
    """First and last index of the tokens whose first character lies in [start, end).

    Characters a normalizer dropped map to no token; the nearest mapped one inside the span
    stands in for them.
    """
    first_char = next(c for c in range(start, end) if encoding.char_to_token(c) is not None)
    last_char = next(
        c for c in range(end - 1, start - 1, -1) if encoding.char_to_token(c) is not None
    )
    first = encoding.char_to_token(first_char)
    if encoding.token_to_chars(first)[0] < start:  # straddles the span start: not a target
        first += 1
    return first, encoding.char_to_token(last_char)
