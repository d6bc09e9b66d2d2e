"""Python-version shims megatron-core's wheel needs (it declares Python >= 3.12)."""

import typing


def ensure_python_compat() -> None:
    """`typing.override` (3.12) is imported by megatron.training; give 3.11 the backport."""
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def use_prebuilt_dataset_helpers() -> None:
    """Skip `compile_helpers` when megatron-core's compiled dataset helpers are importable.

    `megatron.training` compiles the C++ dataset helpers with `make` at start-up; the wheel
    ships them prebuilt but without the Makefile, so the compile step exits the run. Where the
    extension imports, there is nothing to compile (source checkouts keep compiling).
    """
    import importlib.util

    from megatron.core.datasets import utils

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        utils.compile_helpers = lambda: None


def make_distributed_optimizer_resumable() -> bool:
    """Let the distributed optimizer resume with torch's Adam (no Apex / Transformer Engine).

    megatron-core's `DistributedOptimizer.state_dict()` reads Adam's per-parameter `step`,
    which torch's Adam only creates at its first step, so building the load template of a
    fresh run fails; and the loaded per-parameter `step` must equal the param-group's. Around
    `load_checkpoint` this (1) gives every parameter a state with zero-gradient steps (values
    that the load then overwrites), (2) loads without autograd, (3) sets each parameter's
    `step` from its param group. With Apex or TE (GPU clusters) nothing changes.
    Returns whether the wrapper was installed.
    """
    import torch
    from megatron.core.optimizer import distrib_optimizer
    from megatron.training import training

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    load_checkpoint = training.load_checkpoint

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

    training.load_checkpoint = load_with_adam_state
    return True
