"""The CPU mode itself, in spawned processes (the test helper applies the library patches)."""

import torch

from tests.helpers.distributed import run_distributed_test


def cpu_mode_behaviour():
    from megatron_dcod.megatron import patches

    assert patches.CPU_MODE in patches.active()  # applied by run_distributed_test's worker
    assert patches.apply(patches.LIBRARY).installed == []  # idempotent
    # CUDA device requests of every spelling land on the CPU
    for device in ("cuda", "cuda:0", torch.device("cuda"), torch.cuda.current_device()):
        assert torch.zeros(2, device=device).device.type == "cpu"
    assert torch.ones(3).cuda().device.type == "cpu"
    assert torch.ones(3).to("cuda").device.type == "cpu"
    assert torch.ones(3).to(torch.device("cuda"), torch.float64).dtype == torch.float64
    assert torch.cuda.device_count() == 1
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    # the stand-in CUDA generator is separate from the CPU default generator
    torch.manual_seed(0)
    torch.cuda.manual_seed(123)
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    assert not torch.equal(cpu_state, cuda_state)
    torch.rand(10)  # advances the CPU generator only
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    draw = torch.rand(4, generator=torch.cuda.default_generators[0])
    torch.cuda.set_rng_state(cuda_state)
    assert torch.equal(torch.rand(4, generator=torch.cuda.default_generators[0]), draw)


def megatron_rng_tracker_forks_the_standin_generator():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(42)
    before = torch.cuda.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.cuda.get_rng_state()
    assert not torch.equal(before, inside)  # the tracker switched to the model-parallel state
    assert torch.equal(torch.cuda.get_rng_state(), before)  # and restored the default one


def test_cpu_mode_behaviour():
    run_distributed_test(cpu_mode_behaviour, world_size=1)


def test_megatron_rng_tracker_on_cpu():
    run_distributed_test(megatron_rng_tracker_forks_the_standin_generator, world_size=1)
