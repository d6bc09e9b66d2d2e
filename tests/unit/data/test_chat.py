"""Chat rendering and the loss mask, against HF's own apply_chat_template and hand-made spans."""

import pytest

from megatron_dcod.data.chat import PLAIN_CHAT_TEMPLATE, ChatTemplateError, ChatTokenizer
from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

from ..conftest import TOKENIZER_TEXTS

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Compute 12 + 7."},
    {"role": "assistant", "content": "12 + 7 = 19."},
    {"role": "user", "content": "And 3 * 4?"},
    {"role": "assistant", "content": "The answer is 12."},
]


def supervised_text(chat_tokenizer, tokens, mask):
    """The supervised tokens decoded turn by turn (runs of consecutive 1s)."""
    runs, current = [], []
    for token, supervised in zip(tokens.tolist(), mask.tolist()):
        if supervised:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [chat_tokenizer.tokenizer.decode(run) for run in runs]


def test_tokens_equal_hf_chat_template(chat_tokenizer):
    ((tokens, _),) = chat_tokenizer.encode([MULTI_TURN])
    reference = chat_tokenizer.tokenizer.apply_chat_template(MULTI_TURN, tokenize=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert tokens.tolist() == list(reference)


def test_every_assistant_turn_and_only_it_is_supervised(chat_tokenizer):
    ((tokens, mask),) = chat_tokenizer.encode([MULTI_TURN])
    assert mask[0] == 0
    # each assistant turn: its content and the end-of-turn token, not the newline after it
    assert supervised_text(chat_tokenizer, tokens, mask) == [
        "12 + 7 = 19.<|im_end|>",
        "The answer is 12.<|im_end|>",
    ]


def test_plain_template_when_the_tokenizer_has_none(tmp_path):
    directory = train_tiny_tokenizer(TOKENIZER_TEXTS, tmp_path, 300, chat_template=None)
    chat_tokenizer = ChatTokenizer(directory)
    assert chat_tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "12 + 7"}]
    assert (
        chat_tokenizer.render(messages)
        == "<|user|>\nHi<|endoftext|>\n<|assistant|>\n12 + 7<|endoftext|>\n"
    )
    ((tokens, mask),) = chat_tokenizer.encode([messages])
    assert supervised_text(chat_tokenizer, tokens, mask) == ["12 + 7<|endoftext|>"]


def test_template_that_rewrites_history_is_refused(tokenizer_dir):
    chat_tokenizer = ChatTokenizer(tokenizer_dir)
    # renders earlier assistant turns differently once a later turn exists (like templates
    # that strip earlier reasoning): the spans cannot be located
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[hidden]"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="turn 2"):
        chat_tokenizer.encode([MULTI_TURN])


def test_unreadable_tokenizer_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ChatTokenizer(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load a tokenizer from .*broken"):
        ChatTokenizer(tmp_path / "broken")
