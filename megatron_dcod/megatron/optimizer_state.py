"""Distributed-optimizer resume with torch's Adam, for machines without Apex or TE."""

from __future__ import annotations

from typing import Callable

import torch


def load_checkpoint_with_adam_state(load_checkpoint: Callable) -> Callable:
    """Wrap `megatron.training.training.load_checkpoint` so the distributed optimizer resumes.

    megatron-core's `DistributedOptimizer.state_dict()` reads Adam's per-parameter `step`,
    which torch's Adam only creates at its first step, so building the load template of a
    fresh run fails; and the loaded per-parameter `step` must equal the param group's. Around
    the load this (1) gives every parameter a state with zero-gradient steps (values that the
    load then overwrites), (2) loads without autograd, (3) sets each parameter's `step` from
    its param group. Registered in `megatron_dcod/megatron/patches.py` (only without Apex/TE).
    """
    from megatron.core.optimizer import distrib_optimizer

    def distributed_optimizers(optimizer) -> list:
        chained = getattr(optimizer, "chained_optimizers", [optimizer])
        return [o for o in chained if isinstance(o, distrib_optimizer.DistributedOptimizer)]

    def load_with_adam_state(model, optimizer, *args, **kwargs):
        resumable = distributed_optimizers(optimizer) if optimizer is not None else []
        for inner in resumable:
            if len(inner.optimizer.state) == 0:
                inner._init_optimizer_states_with_dummy_values()
        with torch.no_grad():
            result = load_checkpoint(model, optimizer, *args, **kwargs)
        for inner in resumable:
            for group in inner.optimizer.param_groups:
                for param in group["params"]:
                    state = inner.optimizer.state.get(param)
                    if state and "step" in group:
                        state["step"] = torch.tensor(float(group["step"]))
        return result

    return load_with_adam_state
