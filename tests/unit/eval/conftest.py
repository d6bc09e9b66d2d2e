"""A tiny random HF causal LM with the unit tests' tokenizer, saved as one local model dir."""

import shutil

import pytest

from tests.helpers.models import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chat_tokenizer, tokenizer_dir):
    """Peaked logits (every parameter N(0, 0.3)): greedy choices are clear; 256 positions."""
    directory = tmp_path_factory.mktemp("tiny_model")
    save_tiny_llama(directory, len(chat_tokenizer.tokenizer), seed=3, init_std=0.3)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory)
    return directory
