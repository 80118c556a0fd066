"""Process groups (torchrun → megatron-core parallel_state) and CPU shims for megatron-core."""
from megatron_simko.parallel.cpu_shims import cpu_mode, cuda_to_cpu, install_cpu_shims
from megatron_simko.parallel.initialize import (
    ParallelLayout,
    current_layout,
    destroy_parallel,
    init_distributed,
    initialize_parallel,
)

__all__ = [
    "ParallelLayout",
    "cpu_mode",
    "cuda_to_cpu",
    "current_layout",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "install_cpu_shims",
]
