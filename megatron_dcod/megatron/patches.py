"""Every runtime replacement of a library attribute the project makes, in one registry.

The project builds on megatron-core through its extension points (model, dataset and forward
step providers, the builder-installed finalize hook, the extra-args provider). Where a library
gives no extension point, the replacement is listed in `PATCHES`: what it replaces, why, the
version it was checked against, when it is needed, and which entry points need it. Nothing
else in the package assigns to a library's attributes.

    applied = patches.apply(patches.TRAINING)   # once, at start-up, before Megatron initializes
    with patches.applied(patches.LIBRARY): ...  # converters, tests: undone when the block ends

Scopes, each including the one before: `IMPORTS` is what importing megatron.training needs and
nothing more (Python 3.11; the DeepSpeed engine, which uses Megatron's datasets, sampler and
LR scheduler but not its devices); `LIBRARY` is what any use of megatron-core in this process
needs (adds the CPU mode); `TRAINING` adds what `megatron.training.pretrain` needs. Applying is idempotent;
`AppliedPatches.undo()` restores every original in reverse order.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

IMPORTS = "imports"
LIBRARY = "library"
TRAINING = "training"
SCOPES = (IMPORTS, LIBRARY, TRAINING)
"""Narrowest first; applying a scope applies the ones before it too."""
MEGATRON_CORE = "megatron-core 0.19.2"
Undo = Callable[[], None]
CPU_MODE = "torch.cuda: device, stream, memory and RNG functions (platform/cpu.py)"


@dataclass(frozen=True)
class Patch:
    """One replacement (or one coherent set of them) and its reason."""

    target: str
    """What is replaced, as `module.attribute` (a set: `module.{a, b, ...}`)."""
    reason: str
    """Why there is no other way, and what would break without it."""
    checked_with: str
    """The library version the replacement was written and tested against."""
    scope: str
    """IMPORTS, LIBRARY or TRAINING: the entry points that need it."""
    needed: Callable[[bool], bool]
    """Whether this process needs it, given whether it runs in CPU mode (CUDA absent)."""
    install: Callable[[], Undo]
    """Makes the replacement; returns the function that undoes it."""


def replace_attribute(owner: Any, name: str, value: Any) -> Undo:
    """`owner.name = value` (owner: an object or a module name); returns the undo."""
    owner = importlib.import_module(owner) if isinstance(owner, str) else owner
    missing = object()
    original = getattr(owner, name, missing)
    setattr(owner, name, value)

    def undo() -> None:
        if original is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, original)

    return undo


def _install_typing_override() -> Undo:
    import typing_extensions

    return replace_attribute(typing, "override", typing_extensions.override)


def _install_cuda_standins() -> Undo:
    from megatron_dcod.platform import cpu

    undos = []
    for name, standin in cpu.cuda_standins().items():
        owner, _, attribute = f"torch.cuda.{name}".rpartition(".")
        undos.append(replace_attribute(owner, attribute, standin))

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


def _install_device_mode() -> Undo:
    from megatron_dcod.platform.cpu import CudaToCpuMode

    mode = CudaToCpuMode()
    mode.__enter__()  # on the mode stack until undone
    return lambda: mode.__exit__(None, None, None)


def _report_cuda_available() -> Undo:
    return replace_attribute(torch.cuda, "is_available", lambda: True)


def _skip_jit_warmup() -> Undo:
    return replace_attribute(
        "megatron.training.training", "set_jit_fusion_options", lambda tp_size=None: None
    )


def _prebuilt_helpers_importable(cpu: bool) -> bool:
    return importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None


def _skip_compile_helpers() -> Undo:
    return replace_attribute("megatron.core.datasets.utils", "compile_helpers", lambda: None)


def _without_apex_or_te(cpu: bool) -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _install_resumable_load() -> Undo:
    from megatron.training import training

    from megatron_dcod.megatron.optimizer_state import load_checkpoint_with_adam_state

    return replace_attribute(
        training, "load_checkpoint", load_checkpoint_with_adam_state(training.load_checkpoint)
    )


PATCHES: tuple[Patch, ...] = (
    Patch(
        target="typing.override",
        reason="megatron.training imports typing.override (Python 3.12); the 3.11 backport "
        "from typing_extensions stands in (the megatron-core wheel declares Python >= 3.12)",
        checked_with=MEGATRON_CORE,
        scope=IMPORTS,
        needed=lambda cpu: not hasattr(typing, "override"),
        install=_install_typing_override,
    ),
    Patch(
        target=CPU_MODE,
        reason="CPU mode: megatron-core asks torch.cuda for devices, streams, events, memory "
        "figures and the CUDA RNG in ~30 places; with one stand-in device, no-op streams and a "
        "CPU generator of its own playing the CUDA one, the same code runs on gloo",
        checked_with=f"{MEGATRON_CORE}, torch 2.13.0",
        scope=LIBRARY,
        needed=lambda cpu: cpu,
        install=_install_cuda_standins,
    ),
    Patch(
        target="torch function mode stack (platform/cpu.py::CudaToCpuMode)",
        reason="CPU mode: every device='cuda' argument, .cuda() and .to('cuda') of megatron-core "
        "is rewritten to the CPU, and CPU tensor types answer as CUDA ones",
        checked_with=f"{MEGATRON_CORE}, torch 2.13.0",
        scope=LIBRARY,
        needed=lambda cpu: cpu,
        install=_install_device_mode,
    ),
    Patch(
        target="torch.cuda.is_available",
        reason="CPU mode: pretrain() initializes Megatron without allow_no_cuda and asserts CUDA; "
        "with every CUDA request served on the CPU the answer True is accurate",
        checked_with=MEGATRON_CORE,
        scope=TRAINING,
        needed=lambda cpu: cpu,
        install=_report_cuda_available,
    ),
    Patch(
        target="megatron.training.training.set_jit_fusion_options",
        reason="CPU mode: the JIT warm-up compiles CUDA fusions on random tensors; on the CPU "
        "it compiles nothing, and its draws move the CPU generator by a TP-dependent amount, so "
        "TP=2 would start from other weights than TP=1",
        checked_with=MEGATRON_CORE,
        scope=TRAINING,
        needed=lambda cpu: cpu,
        install=_skip_jit_warmup,
    ),
    Patch(
        target="megatron.core.datasets.utils.compile_helpers",
        reason="megatron.training compiles the C++ dataset helpers with make at start-up; the "
        "wheel ships them prebuilt but without the Makefile, so the step exits the run (source "
        "checkouts, where the extension is not importable, keep compiling)",
        checked_with=MEGATRON_CORE,
        scope=TRAINING,
        needed=_prebuilt_helpers_importable,
        install=_skip_compile_helpers,
    ),
    Patch(
        target="megatron.training.training.load_checkpoint",
        reason="distributed-optimizer resume with torch's Adam (no Apex/TE): the load template "
        "needs Adam state that torch creates only at its first step, and the per-parameter "
        "step must be restored from the param group or the first step after resume differs "
        "(megatron_dcod/megatron/optimizer_state.py)",
        checked_with=f"{MEGATRON_CORE}, torch 2.13.0",
        scope=TRAINING,
        needed=_without_apex_or_te,
        install=_install_resumable_load,
    ),
)

_active: dict[str, Undo] = {}  # target → undo of the patches installed in this process


@dataclass
class AppliedPatches:
    """What one `apply` call installed (patches already active are not installed twice)."""

    installed: list[tuple[str, Undo]] = field(default_factory=list)
    cpu: bool = False
    """Whether the CPU mode is on in this process (CUDA is absent)."""

    def undo(self) -> None:
        """Restore, in reverse order, what this call installed."""
        for target, undo in reversed(self.installed):
            undo()
            _active.pop(target, None)
        self.installed.clear()


def apply(scope: str = LIBRARY) -> AppliedPatches:
    """Install every needed patch of `scope` and the narrower ones, in registry order."""
    scopes = set(SCOPES[: SCOPES.index(scope) + 1])
    # read once, first: the TRAINING scope makes torch.cuda.is_available() answer True
    cpu = CPU_MODE in _active or not torch.cuda.is_available()
    applied = AppliedPatches(cpu=cpu)
    for patch in PATCHES:
        if patch.scope in scopes and patch.target not in _active and patch.needed(cpu):
            undo = patch.install()
            _active[patch.target] = undo
            applied.installed.append((patch.target, undo))
    return applied


@contextlib.contextmanager
def applied(scope: str = LIBRARY) -> Iterator[AppliedPatches]:
    """`apply(scope)` for the duration of a block."""
    patches = apply(scope)
    try:
        yield patches
    finally:
        patches.undo()


def active() -> list[str]:
    """Targets of the patches installed in this process, in the order they were installed."""
    return list(_active)


def undo_all() -> None:
    """Undo every patch installed in this process, newest first (tests)."""
    for target in reversed(list(_active)):
        _active.pop(target)()
