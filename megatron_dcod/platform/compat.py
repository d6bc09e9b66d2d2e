"""Python-version shims megatron-core's wheel needs (it declares Python >= 3.12)."""

import typing


def ensure_python_compat() -> None:
    """`typing.override` (3.12) is imported by megatron.training; give 3.11 the backport."""
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
