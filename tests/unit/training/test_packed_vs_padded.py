"""Packed batches (THD, attention and RoPE restarted per trace) give each trace the loss it gets
alone in a padded row — through the real dataset, batch and model code."""

import numpy as np
import torch

from tests.helpers.distributed import run_distributed_test
from tests.helpers.traces import write_synthetic_traces

SEQ = 48


def per_trace_losses(prefix, pack: bool) -> dict[int, float]:
    """{trace index: Σ token CE} over one epoch of sequences."""
    from megatron.core.datasets.utils import Split

    from megatron_dcod.config import TraceDataConfig
    from megatron_dcod.data.sequences import TraceBlendConfig, TraceSequenceDataset
    from megatron_dcod.data.trace_format import TraceDataset
    from megatron_dcod.training.batch import next_batch

    traces = TraceDataset(prefix)
    config = TraceBlendConfig(
        random_seed=7, sequence_length=SEQ, split="100,0,0", trace=TraceDataConfig(SEQ, pack=pack)
    )
    dataset = TraceSequenceDataset(
        traces, str(prefix), np.arange(len(traces)), None, Split.train, config
    )
    model = build_tiny_student()
    losses, traces_per_row = {}, []
    for index in range(0, len(dataset), 3):  # micro-batches of up to 3 sequences
        rows = [dataset[i] for i in range(index, min(index + 3, len(dataset)))]
        collated = {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}
        batch, packed_seq_params = next_batch(iter([collated]), torch.device("cpu"), pack)
        b, s = batch["tokens"].shape
        with torch.no_grad():
            if pack:
                token_loss = model(
                    batch["tokens"].view(1, -1), batch["position_ids"].view(1, -1), None,
                    labels=batch["labels"].view(1, -1),
                    packed_seq_params=packed_seq_params,
                ).view(b, s)  # fmt: skip
            else:
                token_loss = model(
                    batch["tokens"], batch["position_ids"], None, labels=batch["labels"]
                )
        for row, sample_index in enumerate(range(index, index + b)):
            start, end = dataset.bin_starts[sample_index], dataset.bin_starts[sample_index + 1]
            traces_per_row.append(end - start)
            segment = rows[row]["segment_ids"]
            for position, trace_index in enumerate(dataset.order[start:end]):
                supervised = (segment == position) & (rows[row]["loss_mask"] > 0)
                losses[int(trace_index)] = float(
                    token_loss[row][torch.from_numpy(supervised)].sum()
                )
    return losses, traces_per_row


def build_tiny_student():
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from megatron_dcod.models.student import StudentSpec, build_student

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, persist_layer_norm=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False,
    )  # fmt: skip
    spec = StudentSpec(64, 128, False, 10000.0, use_transformer_engine=False)
    return build_student(spec, config).eval()


def packed_equals_padded(prefix):
    (padded, one_each), (packed, traces_per_row) = (
        per_trace_losses(prefix, pack=False),
        per_trace_losses(prefix, pack=True),
    )
    assert padded.keys() == packed.keys() and len(padded) == 40
    assert set(one_each) == {1}  # padded: one trace a row; packed: several (the point here)
    shared = sum(count >= 2 for count in traces_per_row)
    assert shared >= 0.8 * len(traces_per_row) and max(traces_per_row) >= 4, traces_per_row
    for trace_index, loss in padded.items():
        assert np.isclose(packed[trace_index], loss, rtol=1e-5, atol=1e-5), trace_index


def test_packed_equals_padded(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "traces", count=40, lengths=(3, 30))
    run_distributed_test(packed_equals_padded, world_size=1, prefix=prefix)
