"""The lab's mean weight by response position against a float64 loop written from the DCOD
equation (w = s·σ((Δ − b)/τ), Δ the token's or the prefix's running mean)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.data.trace_format import TraceDataset
from megatron_dcod.lab.positions import main as positions_main
from megatron_dcod.lab.positions import weights_by_position
from tests.helpers.traces import write_synthetic_traces


def _reference(model, dataset, scale, offset, temperature, scope):
    sums, counts = {}, {}
    for index in range(len(dataset)):
        trace = dataset[index]
        with torch.no_grad():
            logits = model(torch.as_tensor(trace.tokens[None], dtype=torch.long)).logits[0]
        logits = logits.double().numpy()
        supervised = np.flatnonzero(trace.loss_mask)
        deltas = []
        for position, token in enumerate(supervised):
            row = logits[token - 1]
            logp = row[trace.tokens[token]] - np.logaddexp.reduce(row)
            deltas.append(logp - float(trace.teacher_logprobs[token]))
            delta = deltas[-1] if scope == "token" else sum(deltas) / len(deltas)
            weight = scale / (1 + np.exp(-(delta - offset) / temperature))
            sums[position] = sums.get(position, 0.0) + weight
            counts[position] = counts.get(position, 0) + 1
    return [sums[p] / counts[p] for p in sorted(counts)], [counts[p] for p in sorted(counts)]


@pytest.mark.parametrize("scope", ["token", "prefix"])
def test_mean_weight_by_position_equals_the_float64_loop(tmp_path, tiny_model_dir, scope):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    prefix = write_synthetic_traces(tmp_path / "traces", count=12, vocab=vocab, lengths=(5, 14))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    config = CorrectionConfig(weighting="dcod", scope=scope, temperature=2.0, offset=-3.0)
    got = weights_by_position(model, TraceDataset(prefix), config, traces=12)
    want, counts = _reference(model.double(), TraceDataset(prefix), 2.0, -3.0, 2.0, scope)
    assert got["count"] == counts and got["positions"] == list(range(len(counts)))
    np.testing.assert_allclose(got["mean_weight"], want, rtol=1e-5)
    assert np.std(got["mean_weight"]) > 1e-3  # the weights do vary: the check can fail


def test_the_command_reads_the_runs_dcod_flags(tmp_path, tiny_model_dir):
    import json

    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    prefix = write_synthetic_traces(tmp_path / "traces", count=4, vocab=vocab, lengths=(5, 9))
    out = tmp_path / "weights.json"
    code = positions_main(["--student", str(tiny_model_dir), "--data-path", str(prefix),
                           "--out", str(out), "--initial-student", str(tiny_model_dir), "--",
                           "--lr", "1e-3", "--dcod-weighting", "dcod", "--dcod-scale", "3",
                           "--dcod-offset", "-12"])  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0 and result["weighting"] == "dcod" and result["traces"] == 4
    assert max(result["mean_weight"]) <= 3 and max(result["mean_weight"]) > 2  # s = 3
    assert result["initial_mean_weight"] == result["mean_weight"]
