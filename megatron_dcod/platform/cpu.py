"""CPU mode: what makes megatron-core run on CPU (gloo) when CUDA is absent (docs/design.md).

megatron-core asks for CUDA in many places: buffers made with `device="cuda"` or
`torch.cuda.current_device()`, `.cuda()` calls, the RNG tracker on the CUDA generator, streams,
events and synchronizes. This module holds the stand-ins that answer all of them without
touching megatron-core; `megatron_dcod/megatron/patches.py` installs (and can undo) them:

- a TorchFunctionMode, kept on the mode stack, rewrites every CUDA device argument (`"cuda"`,
  `"cuda:0"`, `torch.device("cuda")`, a bare device index) to CPU, turns `Tensor.cuda()`
  into a no-op and names CPU tensor types as CUDA ones (`Tensor.type()`);
- `torch.cuda` reports one device, already initialized, and its RNG functions drive a stand-in
  "CUDA" generator: a CPU `torch.Generator` of its own (not the CPU default generator), so that
  megatron's tracker can seed, save and restore it independently of the CPU stream;
- streams, events, synchronize and memory statistics become no-ops.

Only applied when `torch.cuda.is_available()` is False; production runs take the normal
CUDA/NCCL path untouched.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

cuda_standin_generator = torch.Generator(device="cpu")
"""Plays the CUDA default generator of device 0."""


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an index means a GPU


def _as_cuda_type_name(name: str) -> str:
    """ "torch.FloatTensor" → "torch.cuda.FloatTensor": CPU tensors play CUDA tensors."""
    return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests in torch calls to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _as_cuda_type_name(func(*args))  # megatron asserts torch.cuda.FloatTensor
        if func in (torch.Tensor.pin_memory, torch.Tensor.record_stream):
            return args[0] if func is torch.Tensor.pin_memory else None
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.pop("pin_memory", False):
            pass  # pinned host memory needs CUDA; plain memory does the same job on CPU
        if func is torch.Tensor.to:
            args = tuple(
                "cpu" if _is_cuda(arg) and not isinstance(arg, bool) else arg for arg in args
            )
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: every method does nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.device = torch.device("cpu")

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NoOpDeviceContext(contextlib.nullcontext):
    """Stands in for the torch.cuda.device context manager (a class: code isinstance-checks it)."""

    def __init__(self, device: Any = None):
        super().__init__()
        self.idx = 0


_DEVICE_PROPERTIES = types.SimpleNamespace(
    name="cpu (megatron-dcod CPU mode)",
    major=9,  # answers megatron's architecture checks as a Hopper-class device
    minor=0,
    total_memory=0,
    multi_processor_count=1,
)


def _manual_seed(seed: int) -> None:
    cuda_standin_generator.manual_seed(int(seed))


def _zero(device: Any = None) -> int:
    return 0


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return cuda_standin_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    cuda_standin_generator.set_state(new_state)


def cuda_standins() -> dict[str, Any]:
    """`torch.cuda` attribute name → its CPU-mode stand-in (`random.` names live in
    `torch.cuda.random`). Installed and undone by `megatron_dcod/megatron/patches.py`."""
    standins = {
        "is_initialized": lambda: True,  # torch.cuda._lazy_call then runs callbacks at once
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "get_device_capability": lambda device=None: (9, 0),
        "get_device_name": lambda device=None: _DEVICE_PROPERTIES.name,
        "Stream": _NoOpStream,
        "Event": _NoOpStream,
        "current_stream": lambda device=None: _NoOpStream(),
        "default_stream": lambda device=None: _NoOpStream(),
        "stream": lambda stream=None: contextlib.nullcontext(),
        "device": _NoOpDeviceContext,
        "get_device_properties": lambda device=None: _DEVICE_PROPERTIES,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda device=None: None,
        # RNG: the stand-in generator behind every torch.cuda RNG entry point
        "default_generators": (cuda_standin_generator,),
        "manual_seed": _manual_seed,
        "manual_seed_all": _manual_seed,
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "random.get_rng_state": _get_rng_state,
        "random.set_rng_state": _set_rng_state,
    }
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        standins[name] = _zero  # no device memory to report
    return standins
