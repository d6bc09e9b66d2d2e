"""Who wrote each token of a trace: the values of the optional per-token `source` array.

A synthesized trace (MOTAB, docs/method.md §7) is stitched from the student's steps, connector
text the synthesis inserts ("However,") and the teacher's continuation. Its record says so with
`segments` (docs/data_format.md, "Input records"); preprocessing turns them into one source per
token, and training can log and restrict the loss per source (`--dcod-train-sources`).

Rule of the array: 0 on every unsupervised token (prompt, chat template), one of the supervised
codes (1 student, 2 teacher, 3 inserted) on every supervised token.
"""

from __future__ import annotations

from typing import Any

SOURCE_NAMES = {0: "prompt", 1: "student", 2: "teacher", 3: "inserted"}
"""Values of the `source` array and their names."""
SUPERVISED_SOURCES = ("student", "teacher", "inserted")
"""The sources a supervised token can have, in code order (1, 2, 3)."""
SOURCE_CODES = {name: code for code, name in SOURCE_NAMES.items()}
"""Name → value of the `source` array."""


def source_error(source: Any, loss_mask: Any) -> str | None:
    """Why a trace's `source` [T] breaks the rule above (None if it does not); numpy arrays."""
    supervised = loss_mask.astype(bool)  # [T]
    valid = (source >= 1) & (source <= len(SUPERVISED_SOURCES))  # [T] a supervised code
    bad = (supervised & ~valid) | (~supervised & (source != 0))  # [T]
    if not bad.any():
        return None
    position = int(bad.argmax())
    expected = "1 (student), 2 (teacher) or 3 (inserted)" if supervised[position] else "0"
    kind = "a supervised" if supervised[position] else "an unsupervised"
    return (
        f"source at token {position} is {int(source[position])} on {kind} token: must be {expected}"
    )
