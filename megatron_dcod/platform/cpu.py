"""CPU mode: make megatron-core run on CPU (gloo) when CUDA is absent (DESIGN.md §3).

megatron-core asks for CUDA in many places: buffers made with `device="cuda"` or
`torch.cuda.current_device()`, `.cuda()` calls, the RNG tracker on the CUDA generator, streams,
events and synchronizes. `apply_cpu_mode()` answers all of them without touching megatron-core:

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

from megatron_dcod.platform.compat import ensure_python_compat

_applied = False
_mode: "CudaToCpuMode | None" = None
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


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.is_initialized = lambda: True  # torch.cuda._lazy_call then runs callbacks at once
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.get_device_capability = lambda device=None: (9, 0)
    cuda.get_device_name = lambda device=None: "cpu (megatron-dcod CPU mode)"
    cuda.Stream = cuda.Event = _NoOpStream
    cuda.current_stream = cuda.default_stream = lambda device=None: _NoOpStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.device = _NoOpDeviceContext
    cuda.get_device_properties = lambda device=None: _DEVICE_PROPERTIES
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        setattr(cuda, name, lambda device=None: 0)
    cuda.empty_cache = lambda: None
    cuda.reset_peak_memory_stats = lambda device=None: None
    # RNG: the stand-in generator behind every torch.cuda RNG entry point
    cuda.default_generators = (cuda_standin_generator,)
    cuda.manual_seed = cuda.manual_seed_all = _manual_seed
    cuda.get_rng_state = cuda.random.get_rng_state = (
        lambda device="cuda": cuda_standin_generator.get_state()
    )
    cuda.set_rng_state = cuda.random.set_rng_state = (
        lambda new_state, device="cuda": cuda_standin_generator.set_state(new_state)
    )


def apply_cpu_mode() -> bool:
    """Make megatron-core run on CPU; a no-op (returning False) when CUDA is available."""
    global _applied, _mode
    ensure_python_compat()
    if torch.cuda.is_available():
        return False
    if not _applied:
        _patch_torch_cuda()
        _mode = CudaToCpuMode()
        _mode.__enter__()  # stays on the mode stack for the life of the process
        _applied = True
    return True


def report_cuda_available() -> None:
    """After `apply_cpu_mode()`: `torch.cuda.is_available()` answers True.

    `megatron.training.pretrain` asserts CUDA before anything else (it initializes without
    `allow_no_cuda`); with every CUDA request already served on CPU, the answer is accurate for
    the stubbed `torch.cuda`. Only the training entry point calls this.
    """
    if not _applied:
        raise RuntimeError("report_cuda_available() needs apply_cpu_mode() first")
    torch.cuda.is_available = lambda: True


def skip_jit_warmup() -> None:
    """In CPU mode, `pretrain` skips its JIT warm-up (DESIGN.md §5).

    The warm-up compiles CUDA fusion kernels by running them on random tensors: on CPU there is
    nothing to compile, and its random draws would move the CPU generator by an amount that
    depends on the TP size, so TP=2 would start from other weights than TP=1.
    """
    from megatron.training import training

    training.set_jit_fusion_options = lambda tp_size=None: None
