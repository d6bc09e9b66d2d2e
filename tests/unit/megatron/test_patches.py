"""The registry of runtime replacements: complete, applied by one call, and undoable."""

import re
from pathlib import Path

from megatron_dcod.megatron import patches
from tests.helpers.distributed import run_distributed_test

PACKAGE = Path(patches.__file__).resolve().parents[1]
LIBRARY_ASSIGNMENT = re.compile(
    r"^\s*(torch|megatron|typing|transformers|training|utils|distrib_optimizer)(\.\w+)+\s*=[^=]"
    r"|\bsetattr\(|\.__enter__\(\)"
)


def test_every_entry_says_what_why_and_against_which_version():
    assert len({patch.target for patch in patches.PATCHES}) == len(patches.PATCHES)
    for patch in patches.PATCHES:
        assert patch.scope in patches.SCOPES
        assert len(patch.reason) > 60 and "megatron-core" in patch.checked_with + patch.reason


def test_no_library_attribute_is_replaced_outside_the_registry():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "patches.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if LIBRARY_ASSIGNMENT.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def apply_and_undo():
    import typing

    import torch
    from megatron.core.datasets import utils
    from megatron.training import training

    originals = {
        "device_count": torch.cuda.device_count,
        "is_available": torch.cuda.is_available,
        "compile_helpers": utils.compile_helpers,
        "load_checkpoint": training.load_checkpoint,
        "set_jit_fusion_options": training.set_jit_fusion_options,
    }
    training_patches = patches.apply(patches.TRAINING)
    installed = [target for target, _ in training_patches.installed]
    assert training_patches.cpu and set(installed) == {
        patch.target for patch in patches.PATCHES if patch.scope == patches.TRAINING
    }
    assert torch.cuda.is_available() and utils.compile_helpers is not originals["compile_helpers"]
    assert training.load_checkpoint is not originals["load_checkpoint"]
    assert patches.apply(patches.TRAINING).installed == []  # idempotent
    training_patches.undo()
    assert torch.cuda.is_available is originals["is_available"]
    assert utils.compile_helpers is originals["compile_helpers"]
    assert training.load_checkpoint is originals["load_checkpoint"]
    assert training.set_jit_fusion_options is originals["set_jit_fusion_options"]
    assert torch.cuda.device_count is originals["device_count"]  # library scope: still on
    assert patches.CPU_MODE in patches.active() and hasattr(typing, "override")


def undo_the_cpu_mode():
    import torch
    from torch.overrides import _get_current_function_mode_stack

    library = patches.apply(patches.LIBRARY)  # already active in the worker: nothing new
    assert library.installed == [] and library.cpu
    with patches.applied(patches.LIBRARY) as nested:
        assert nested.installed == []
    assert torch.zeros(1, device="cuda").device.type == "cpu"
    patches.undo_all()  # what the test worker applied
    assert patches.active() == []
    assert torch.cuda.device_count() == 0 and not _get_current_function_mode_stack()
    assert not hasattr(__import__("typing"), "override")  # Python 3.11: the backport is gone


def test_training_scope_is_applied_once_and_undone():
    run_distributed_test(apply_and_undo, world_size=1)


def test_library_scope_undo_restores_torch():
    run_distributed_test(undo_the_cpu_mode, world_size=1)
