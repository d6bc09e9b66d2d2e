"""Inference-engine records built by hand from real log-probs of the tests' tiny model: what vLLM,
SGLang and an OpenAI-compatible server answer for the rendered conversation sent as the prompt
(docs/data_format.md, "Inference-engine outputs")."""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Scored:
    """A conversation, its student tokenization and the model's float64 log-probs over it."""

    messages: list[dict]
    tokens: np.ndarray  # [T] int64
    loss_mask: np.ndarray  # [T] uint8
    logp: np.ndarray  # [T, V] float64: row i is log p(· | tokens_<i); row 0 NaN

    def actual(self, i: int) -> float:
        return float(self.logp[i, self.tokens[i]])

    def rank(self, i: int, token: int) -> int:
        return int((self.logp[i] > self.logp[i, token]).sum()) + 1

    def top(self, i: int, k: int) -> list[int]:
        return np.argsort(-self.logp[i], kind="stable")[:k].tolist()


def score_conversation(model, chat_tokenizer, messages: list[dict]) -> Scored:
    ((tokens, mask),) = chat_tokenizer.encode([messages])
    tokens = tokens.astype(np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)[None]).logits[0].double()  # [T, V]
    logp = np.full(logits.shape, np.nan)
    logp[1:] = torch.log_softmax(logits[:-1], dim=-1).numpy()
    return Scored(messages, tokens, mask, logp)


def _conversation(scored: Scored) -> dict:
    return {"messages": scored.messages, "id": "r"}


def vllm_entries(scored: Scored, i: int, k: int, int_keys: bool = False) -> dict:
    """vLLM's prompt_logprobs element i: the top-k, plus the actual token when outside it."""
    token = int(scored.tokens[i])
    wanted = scored.top(i, k) + ([] if token in scored.top(i, k) else [token])
    return {
        (t if int_keys else str(t)): {
            "logprob": float(scored.logp[i, t]),
            "rank": scored.top(i, k).index(t) + 1 if t in scored.top(i, k) else scored.rank(i, t),
            "decoded_token": "x",
        }
        for t in wanted
    }


def vllm_record(scored: Scored, k: int, server: bool = False) -> dict:
    """A dumped RequestOutput (top level), or the server's response with choices[0]."""
    prompt_logprobs = [None] + [vllm_entries(scored, i, k) for i in range(1, len(scored.tokens))]
    ids = scored.tokens.tolist()
    if server:
        choice = {"index": 0, "text": "x", "prompt_logprobs": prompt_logprobs}
        return {**_conversation(scored), "choices": [choice], "prompt_token_ids": ids}
    return {**_conversation(scored), "prompt_token_ids": ids, "prompt_logprobs": prompt_logprobs}


def sglang_record(scored: Scored, k: int, start: int = 0, input_ids: bool = False) -> dict:
    """/generate's meta_info from logprob_start_len `start` on: the first logprob null."""
    positions = range(start, len(scored.tokens))
    token_logprobs = [
        [None if i == start else scored.actual(i), int(scored.tokens[i]), None] for i in positions
    ]
    top = [
        None if i == start else [[float(scored.logp[i, t]), t, None] for t in scored.top(i, k)]
        for i in positions
    ]
    meta = {"input_token_logprobs": token_logprobs, "id": "abc", "finish_reason": None}
    if k:
        meta["input_top_logprobs"] = top
    record = {**_conversation(scored), "text": "x", "meta_info": meta}
    if input_ids:
        record["input_ids"] = scored.tokens.tolist()
    elif start:
        record["logprob_start_len"] = start
    return record


def openai_record(
    scored: Scored, k: int, text_of=None, generated: int = 1, usage: bool = True
) -> dict:
    """A completions response to echo=true, logprobs=k, max_tokens=`generated`: vLLM writes the
    actual token and the top-k per position, and the generated tokens follow the prompt.
    Tokens are 'token_id:N' strings, or `text_of(token id)` (e.g. the tokenizer's decode)."""
    show = text_of or (lambda t: f"token_id:{t}")
    tokens, values, top = [], [], []
    for i, token in enumerate(scored.tokens.tolist() + [5] * generated):
        real = i < len(scored.tokens)
        tokens.append(show(token))
        values.append(None if i == 0 else scored.actual(i) if real else -1.5)
        if i == 0:
            top.append(None)
            continue
        if real:
            wanted = [token] + scored.top(i, k)
            top.append({show(t): float(scored.logp[i, t]) for t in wanted})
        else:  # the sampled token and the top-k of its (made-up) distribution
            top.append(
                {show(t): -1.5 if t == token else -0.1 * t for t in [token, 1, 2, 3][: k + 1]}
            )
    logprobs = {"tokens": tokens, "token_logprobs": values, "top_logprobs": top}
    logprobs["text_offset"] = list(range(len(tokens)))
    choice = {"index": 0, "text": "x", "logprobs": logprobs, "finish_reason": "length"}
    record = {**_conversation(scored), "object": "text_completion", "choices": [choice]}
    if usage:
        prompt = len(scored.tokens)
        record["usage"] = {"prompt_tokens": prompt, "completion_tokens": generated}
    return record


def expected_teacher(scored: Scored, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """teacher_logprobs [T], top-k ids [T, k], top-k log-probs [T, k] at the supervised
    positions, 0 elsewhere: what the dataset must hold."""
    length = len(scored.tokens)
    logprobs, ids, values = np.zeros(length), np.zeros((length, k), int), np.zeros((length, k))
    for i in np.flatnonzero(scored.loss_mask):
        logprobs[i] = scored.actual(i)
        ids[i] = scored.top(i, k)
        values[i] = scored.logp[i, ids[i]]
    return logprobs, ids, values
