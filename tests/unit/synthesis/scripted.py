"""Scripted engines for the step-loop tests: a character tokenizer, and engines that answer
from tables keyed by the context text (steps, teacher values, entropies, continuations)."""

import math
from dataclasses import dataclass, field

from megatron_dcod.inference.engine import Generation, Score


class CharTokenizer:
    """One token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def text_of(ids):
    return "".join(chr(i) for i in ids)


@dataclass
class ScriptedEngine:
    """generate: steps[context] = (text, finish_reason) or an error string; score: the value of
    a continuation is values[text] (every token log V), the top-k after it is topk[context +
    continuation] (default one entry: H = 0); failing[text]: its score fails."""

    steps: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    topk: dict = field(default_factory=dict)
    failing: set = field(default_factory=set)
    name: str = "scripted"
    calls: list = field(default_factory=list)

    def generate(self, contexts, sampling, seeds, max_new_tokens=None):
        results = []
        limits = max_new_tokens or [sampling.max_new_tokens] * len(contexts)
        for ids, limit in zip(contexts, limits):
            context = text_of(ids)
            self.calls.append(("generate", context, limit, sampling.stop))
            answer = self.steps[context]
            if isinstance(answer, str):
                results.append(Generation("", error=answer))
                continue
            text, finish = answer
            results.append(Generation(text, [ord(c) for c in text], finish))
        return results

    def score(self, requests, topk):
        scores = []
        for context, continuation in requests:
            text = text_of(continuation)
            self.calls.append(("score", text_of(context), text))
            if text in self.failing:
                scores.append(Score(error="scoring failed: simulated"))
                continue
            value = self.values.get(text, 1.0)
            logprobs = [math.log(value)] * len(continuation)
            top = self.topk.get(text_of(context) + text, [0.0])
            scores.append(Score(logprobs, list(range(len(top))), top))
        return scores
