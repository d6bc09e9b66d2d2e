"""Training on megatron.training.pretrain: providers, forward step, metrics."""
