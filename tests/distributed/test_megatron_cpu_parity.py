"""megatron-core on CPU with 2 gloo ranks: TP=2 and PP=2 compute what TP=1 / PP=1 compute."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers.distributed import run_distributed_test

VOCAB, SEQ, BATCH, LAYERS, SEED = 128, 16, 4, 4, 1234


def build_gpt(tp: int, pp: int):
    """A tiny Llama-style GPTModel (RMSNorm, SwiGLU, RoPE), seeded as Megatron seeds it."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def batch():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return tokens[:, :-1], positions, tokens[:, 1:]  # input_ids, position_ids, labels [b, s]


def forward_and_backward(model):
    input_ids, position_ids, labels = batch()
    logits = model(input_ids, position_ids, attention_mask=None)  # [b, s, v / tp]
    token_loss = model(input_ids, position_ids, attention_mask=None, labels=labels)  # [b, s]
    token_loss.mean().backward()
    return logits.detach(), token_loss.detach()


def gather_vocab(logits):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)  # [b, s, v]


def tp2_matches_tp1(perturb: bool = False):
    from megatron.core import parallel_state

    reference = build_gpt(tp=1, pp=1)
    logits_1, loss_1 = forward_and_backward(reference)
    norm_grad_1 = reference.decoder.final_layernorm.weight.grad.clone()
    fc2_grad_1 = reference.decoder.layers[1].mlp.linear_fc2.weight.grad.clone()  # [h, ffn]

    model = build_gpt(tp=2, pp=1)
    if perturb:
        with torch.no_grad():
            model.decoder.layers[0].mlp.linear_fc2.weight.add_(1e-3)
    logits_2, loss_2 = forward_and_backward(model)
    rank = parallel_state.get_tensor_model_parallel_rank()
    torch.testing.assert_close(gather_vocab(logits_2), logits_1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_2, loss_1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model.decoder.final_layernorm.weight.grad, norm_grad_1, atol=1e-5, rtol=1e-4
    )
    fc2_shard = fc2_grad_1.chunk(2, dim=1)[rank]  # row-parallel: input dim is split
    torch.testing.assert_close(
        model.decoder.layers[1].mlp.linear_fc2.weight.grad, fc2_shard, atol=1e-5, rtol=1e-4
    )


def test_tp2_matches_tp1():
    run_distributed_test(tp2_matches_tp1)


def test_tp_parity_check_can_fail():
    try:
        run_distributed_test(tp2_matches_tp1, perturb=True)
    except AssertionError as error:
        assert "Tensor-likes are not close" in str(error)
    else:
        raise AssertionError("a perturbed TP=2 model passed the parity check")


def stage_state_dict(full_state: dict, stage: int, stages: int, model) -> dict:
    """The part of a PP=1 state dict that one pipeline stage holds, layers renumbered locally."""
    per_stage = LAYERS // stages
    wanted = {}
    for key, value in full_state.items():
        if key.startswith("decoder.layers."):
            layer = int(key.split(".")[2])
            if stage * per_stage <= layer < (stage + 1) * per_stage:
                local = key.replace(f"layers.{layer}.", f"layers.{layer - stage * per_stage}.", 1)
                wanted[local] = value
        elif key in model.state_dict():
            wanted[key] = value
    return wanted


def pipeline_losses(model, num_microbatches: int = 2) -> list:
    """Megatron's own schedule: no pipelining at PP=1, 1F1B at PP=2."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    input_ids, position_ids, labels = batch()
    micro = BATCH // num_microbatches
    microbatches = iter(
        [
            (input_ids[i : i + micro], position_ids[i : i + micro], labels[i : i + micro])
            for i in range(0, BATCH, micro)
        ]
    )

    def forward_step(data_iterator, stage_model):
        ids, positions, targets = next(data_iterator)
        token_loss = stage_model(ids, positions, attention_mask=None, labels=targets)  # [b, s]

        def loss_func(output):
            loss = output.mean()
            return loss, {"loss": loss.detach()}

        return token_loss, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=microbatches,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=micro,
        forward_only=False,
    )


def pp2_matches_pp1():
    from megatron.core import parallel_state

    reference = build_gpt(tp=1, pp=1)
    full_state = {
        k: v.clone() if torch.is_tensor(v) else v for k, v in reference.state_dict().items()
    }
    losses_1 = [entry["loss"] for entry in pipeline_losses(reference)]
    grads_1 = {name: p.grad.clone() for name, p in reference.named_parameters()}

    model = build_gpt(tp=1, pp=2)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model.load_state_dict(stage_state_dict(full_state, stage, 2, model), strict=True)
    losses_2 = [entry["loss"] for entry in pipeline_losses(model)]
    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(torch.stack(losses_2), torch.stack(losses_1))
        grad_name = "decoder.final_layernorm.weight"
        torch.testing.assert_close(
            dict(model.named_parameters())[grad_name].grad, grads_1[grad_name], atol=1e-5, rtol=1e-4
        )
    else:
        assert losses_2 == []  # only the last stage computes the loss
        grad_name = "embedding.word_embeddings.weight"
        torch.testing.assert_close(
            dict(model.named_parameters())[grad_name].grad, grads_1[grad_name], atol=1e-5, rtol=1e-4
        )


def test_pp2_matches_pp1():
    run_distributed_test(pp2_matches_pp1)
