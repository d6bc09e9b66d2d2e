"""Fixtures shared by the unit tests: a tiny tokenizer trained here, record builders."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_dcod.data.chat import ChatTokenizer
from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer
from tests.helpers.models import TOKENIZER_TEXTS


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(TOKENIZER_TEXTS, tmp_path_factory.mktemp("tokenizer"), 320)


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer_dir) -> ChatTokenizer:
    return ChatTokenizer(tokenizer_dir)


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def teacher_record(chat_tokenizer, prompt: str, response: str, seed: int, topk: int = 0) -> dict:
    """A prompt/response record whose teacher arrays cover the student's supervised tokens."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ((tokens, mask),) = chat_tokenizer.encode([messages])
    response_ids = tokens[mask.astype(bool)]
    rng = np.random.default_rng(seed)
    record = {
        "prompt": prompt,
        "response": response,
        "teacher_token_ids": response_ids.tolist(),
        "teacher_logprobs": (-rng.exponential(1.0, len(response_ids))).tolist(),
        "answer": str(seed),
    }
    if topk:
        record["teacher_topk"] = [
            [
                {"id": int(i), "logprob": float(-rng.exponential() - rank)}
                for rank, i in enumerate(
                    rng.choice(len(chat_tokenizer.tokenizer), topk, replace=False)
                )
            ]
            for _ in response_ids
        ]
    return record


PROBLEMS = [
    ("Compute 12 + 7.", "Start with 12.\n\nAdd 7: 12 + 7 = 19.\n\nThe answer is \\boxed{19}."),
    ("What is 3 * 4?", "Multiply: 3 * 4 = 12. The answer is \\boxed{12}."),
    ("Compute 5 + 5 + 1.", "Add 5: 5 + 5 = 10.\n\nAdd 1: 10 + 1 = 11. \\boxed{11}"),
    ("Be brief: 2 + 2?", "4"),
]


@pytest.fixture
def teacher_records(chat_tokenizer) -> list[dict]:
    return [
        teacher_record(chat_tokenizer, prompt, response, seed, topk=3)
        for seed, (prompt, response) in enumerate(PROBLEMS * 3)
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chat_tokenizer, tokenizer_dir):
    """A tiny random Llama with the tests' tokenizer in one dir: peaked logits (parameters
    N(0, 0.3)) make greedy choices clear; 256 positions."""
    import shutil

    from tests.helpers.models import save_tiny_llama

    directory = tmp_path_factory.mktemp("tiny_model")
    save_tiny_llama(directory, len(chat_tokenizer.tokenizer), seed=3, init_std=0.3)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory)
    return directory
