"""Tiny HF causal LMs for the quickstart: make, pre-train briefly, sample traces with log-probs.

Plain PyTorch on purpose: these stand in for an existing teacher and an existing student
checkpoint; the project's own training (Megatron, TP=2) starts from the student they produce.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_dcod.data.chat import ChatTokenizer

IGNORE = -100


def make_llama(tokenizer, hidden: int, layers: int, heads: int, seed: int):
    """A Llama-family model sized for a CPU, vocabulary and special ids from `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 16 * 16,  # the SwiGLU ratio, 16-aligned
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def chat_examples(tokenizer_dir: Path, pairs: list[tuple[str, str]]) -> list[tuple]:
    """(token ids, loss mask) of each (prompt, response) chat, rendered and masked exactly as
    tools/preprocess_traces.py does it (the response and its end-of-turn token are targets)."""
    chats = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        for prompt, response in pairs
    ]
    return ChatTokenizer(tokenizer_dir).encode(chats)


def pretrain(
    model, examples: list[tuple], steps: int, batch_size: int, lr: float, desc: str
) -> list[float]:
    """AdamW with warmup + cosine on the response tokens; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))),
    )
    rng, losses = random.Random(0), []
    model.train()
    progress = tqdm(range(steps), desc=desc, unit="step")
    for _ in progress:
        input_ids, labels = _batch(rng.sample(examples, batch_size), model.config.pad_token_id)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def _batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [b, s] ids and labels (IGNORE where the loss mask is 0 and on padding)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), IGNORE)
    for row, (ids, loss_mask) in enumerate(examples):
        ids = torch.from_numpy(ids.astype("int64"))
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = ids.where(torch.from_numpy(loss_mask) == 1, IGNORE)
    return input_ids, labels


def save(model, tokenizer, out_dir: Path) -> Path:
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def sample_with_logprobs(
    model, tokenizer, prompts: list[str], max_new_tokens: int, topk: int, seed: int
) -> list[dict]:
    """One sample per prompt at temperature 1, with the log-prob of every sampled token and
    the top-k alternatives (what a vLLM teacher returns with `logprobs=k`).

    Returns {prompt, response, teacher_token_ids, teacher_logprobs, teacher_topk} per prompt;
    the token lists end with the end-of-turn token when the sample finished.
    """
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"
    chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
    texts = [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        for chat in chats
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    plain_sampling = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    out = model.generate(**batch, generation_config=plain_sampling)
    new_tokens = out.sequences[:, batch["input_ids"].shape[1] :]  # [b, t]
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [b, t, v]
    return [
        _sampled_record(prompt, row_tokens, row_logprobs, tokenizer, topk)
        for prompt, row_tokens, row_logprobs in zip(prompts, new_tokens, logprobs)
    ]


def _sampled_record(prompt, tokens, logprobs, tokenizer, topk: int) -> dict:
    """Cut a sampled row after its end-of-turn token (or at the limit) and read its log-probs."""
    tokens = tokens.tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    logprobs = logprobs[: len(tokens)]  # [t, v]
    chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]  # [t]
    top_values, top_ids = logprobs.topk(topk, dim=-1)  # [t, k]
    return {
        "prompt": prompt,
        "response": tokenizer.decode(tokens, skip_special_tokens=True),
        "teacher_token_ids": tokens,
        "teacher_logprobs": [round(value, 6) for value in chosen.tolist()],
        "teacher_topk": [
            [{"id": i, "logprob": round(v, 6)} for i, v in zip(ids, values)]
            for ids, values in zip(top_ids.tolist(), top_values.tolist())
        ],
    }


def canonically_tokenized(tokenizer_dir: Path, samples: list[dict]) -> list[bool]:
    """Whether preprocessing will tokenize each sampled text back to the sampled ids (a sampler
    may pick, say, `1` `9` where the tokenizer writes `19`); a record that differs is refused."""
    encoded = chat_examples(tokenizer_dir, [(s["prompt"], s["response"]) for s in samples])
    return [
        ids[loss_mask == 1].tolist() == sample["teacher_token_ids"]
        for (ids, loss_mask), sample in zip(encoded, samples)
    ]
