"""Process groups (torchrun → megatron-core parallel_state), the device policy, CPU shims for megatron-core; the
TP × PP × DP ≡ one-device harness is ``equivalence.py`` (imported on its own: tools/check_parallel_equivalence.py)."""
from megatron_simko.parallel.cpu_shims import cpu_mode, cuda_to_cpu, install_cpu_shims
from megatron_simko.parallel.devices import all_reduce, check_same_device, collective_device, trainer_device
from megatron_simko.parallel.initialize import (
    ParallelLayout,
    current_layout,
    destroy_parallel,
    init_distributed,
    initialize_parallel,
)

__all__ = [
    "ParallelLayout",
    "all_reduce",
    "check_same_device",
    "collective_device",
    "cpu_mode",
    "cuda_to_cpu",
    "current_layout",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "install_cpu_shims",
    "trainer_device",
]
