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
