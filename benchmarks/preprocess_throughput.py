#!/usr/bin/env python
"""Preprocessing throughput: tools/preprocess_traces.py end to end vs raw batch-encode.

Generates (once, cached in --work-dir) a corpus of long reasoning-like traces whose records
carry teacher log-probs and token ids, then measures at 1 and 2 workers:
  raw   the same tokenizer batch-encoding the same rendered conversations, one core per worker
        (processes already started: pure tokenization);
  e2e   preprocess_traces() on the corpus: reading, JSON parsing, chat template, tokenization,
        alignment checks, writing the dataset (worker start-up included).
Also bytes per token on disk without and with a teacher top-8.

    python benchmarks/preprocess_throughput.py [--corpus-mb 200] [--work-dir /tmp/dcod-bench]

Last line: JSON with tokens_per_s, raw_tokens_per_s, ratio_to_raw, bytes_per_token (per worker
count). Goal: ratio_to_raw >= 0.70.
"""

import argparse
import json
import os
import random
import sys
import time
from multiprocessing import get_context
from pathlib import Path

os.environ["RAYON_RS_NUM_CPUS"] = "1"  # raw baseline and every worker: one core each
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from megatron_dcod.config import PreprocessConfig  # noqa: E402
from megatron_dcod.data.chat import ChatTokenizer  # noqa: E402
from megatron_dcod.data.preprocess import preprocess_traces  # noqa: E402
from megatron_dcod.data.records import iter_raw_records, parse_record  # noqa: E402
from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer  # noqa: E402
from megatron_dcod.config import RecordFields  # noqa: E402

WORDS = (
    "therefore we get so the value of then substitute into check that both sides equal "
    "consider the case where let denote sum product remainder divisible by hence it "
    "follows factor prime integer equation solve for wait let me verify again carefully"
).split()


def reasoning_step(rng: random.Random) -> str:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))
    formula = rng.choice([f"{a} + {b} = {a + b}", f"{a} * {b} = {a * b}", f"{a} - {b} = {a - b}"])
    return f"{words.capitalize()}: {formula}, so x_{rng.randint(1, 9)} = {a % 97}."


def make_record(rng: random.Random, tokenizer: ChatTokenizer, topk: int) -> dict:
    prompt = f"Problem {rng.randint(1, 10**6)}: " + reasoning_step(rng) + " Find x."
    steps = [reasoning_step(rng) for _ in range(rng.randint(60, 240))]
    response = "\n\n".join(steps) + f"\n\nThe answer is \\boxed{{{rng.randint(0, 999)}}}."
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ((tokens, mask),) = tokenizer.encode([messages])
    response_ids = tokens[mask.astype(bool)].tolist()
    logprobs = [round(-rng.expovariate(3.0), 6) for _ in response_ids]
    record = {
        "prompt": prompt,
        "response": response,
        "teacher_token_ids": response_ids,
        "teacher_logprobs": logprobs,
    }
    if topk:
        record["teacher_topk"] = [
            [
                {"id": rng.randrange(len(tokenizer.tokenizer)), "logprob": round(lp - r, 6)}
                for r in range(topk)
            ]
            for lp in logprobs
        ]
    return record


def make_corpus(path: Path, tokenizer: ChatTokenizer, megabytes: float, topk: int = 0) -> None:
    rng, written = random.Random(0), 0
    with open(path.with_suffix(".tmp"), "w") as out:
        while written < megabytes * 2**20:
            line = json.dumps(make_record(rng, tokenizer, topk)) + "\n"
            out.write(line)
            written += len(line)
    path.with_suffix(".tmp").replace(path)


def rendered_texts(corpus: Path, tokenizer: ChatTokenizer) -> list[str]:
    texts = []
    for location, payload in iter_raw_records(str(corpus)):
        texts.append(tokenizer.render(parse_record(payload, location, RecordFields()).messages))
    return texts


_raw_tokenizer = None


def _load_raw(tokenizer_dir: str) -> None:
    global _raw_tokenizer
    _raw_tokenizer = ChatTokenizer(tokenizer_dir).tokenizer


def _raw_encode(texts: list[str]) -> int:
    encoded = _raw_tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(ids) for ids in encoded)


def raw_tokens_per_s(tokenizer_dir: Path, texts: list[str], workers: int) -> float:
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    with get_context("spawn").Pool(workers, _load_raw, (str(tokenizer_dir),)) as pool:
        pool.map(_raw_encode, [texts[:1]] * workers)  # start-up and warm-up, not timed
        started = time.perf_counter()
        tokens = sum(pool.map(_raw_encode, batches, chunksize=1))
        return tokens / (time.perf_counter() - started)


def end_to_end(corpus: Path, tokenizer_dir: Path, prefix: Path, workers: int) -> tuple:
    config = PreprocessConfig(
        inputs=(str(corpus),),
        output_prefix=str(prefix),
        tokenizer=str(tokenizer_dir),
        workers=workers,
        overwrite=True,
    )
    started = time.perf_counter()
    meta = preprocess_traces(config)
    return meta["counts"]["tokens"] / (time.perf_counter() - started), meta


def bytes_per_token(prefix: Path, meta: dict) -> float:
    files = [p for p in prefix.parent.glob(prefix.name + "_*") if p.suffix in (".bin", ".idx")]
    return sum(p.stat().st_size for p in files) / meta["counts"]["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=200.0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dcod-bench-preprocess"))
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        sample = [reasoning_step(random.Random(i)) for i in range(20000)]
        train_tiny_tokenizer(sample, tokenizer_dir, vocab_size=8192)
    tokenizer = ChatTokenizer(tokenizer_dir)
    corpus, topk_corpus = work / f"corpus-{args.corpus_mb:g}mb.jsonl", work / "corpus-top8.jsonl"
    if not corpus.exists():
        make_corpus(corpus, tokenizer, args.corpus_mb)
    if not topk_corpus.exists():
        make_corpus(topk_corpus, tokenizer, 20, topk=8)
    texts = rendered_texts(corpus, tokenizer)

    results = {"benchmark": "preprocess_throughput", "corpus_mb": corpus.stat().st_size / 2**20}
    print(f"corpus {corpus} ({results['corpus_mb']:.1f} MB, {len(texts)} records)")
    print(f"{'workers':>8} {'raw tok/s':>12} {'e2e tok/s':>12} {'ratio':>7}")
    for workers in (1, 2):
        raw = raw_tokens_per_s(tokenizer_dir, texts, workers)
        e2e, meta = end_to_end(corpus, tokenizer_dir, work / "out" / "plain", workers)
        results[f"workers_{workers}"] = {
            "tokens_per_s": e2e,
            "raw_tokens_per_s": raw,
            "ratio_to_raw": e2e / raw,
        }
        print(f"{workers:>8} {raw:>12.0f} {e2e:>12.0f} {e2e / raw:>7.3f}")
    _, top8_meta = end_to_end(topk_corpus, tokenizer_dir, work / "out" / "top8", 2)
    results["tokens"] = meta["counts"]["tokens"]
    results["bytes_per_token"] = {
        "without_topk": bytes_per_token(work / "out" / "plain", meta),
        "with_top8": bytes_per_token(work / "out" / "top8", top8_meta),
    }
    print(f"bytes per token on disk: {results['bytes_per_token']}")
    best = results["workers_2"]
    results.update(
        tokens_per_s=best["tokens_per_s"],
        raw_tokens_per_s=best["raw_tokens_per_s"],
        ratio_to_raw=min(results[f"workers_{w}"]["ratio_to_raw"] for w in (1, 2)),
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
