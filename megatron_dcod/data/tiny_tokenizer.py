"""Train a tiny byte-level BPE tokenizer and save it as an HF tokenizer dir.

For the CPU quickstart and the tests, which must not download anything: the result loads with
`AutoTokenizer.from_pretrained(dir)` like any hub tokenizer, ChatML template included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tiny_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 512,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Train byte-level BPE on `texts`, save an HF fast tokenizer to `out_dir`, return the dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>" if chat_template == CHATML_TEMPLATE else "<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
