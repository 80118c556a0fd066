"""megatron_simko: SimKO (Simple Pass@K Optimization) RLVR training on megatron-core with vLLM rollouts.

One RL step, file by file:
  rollout/   vLLM generation (n samples per prompt) and Megatron -> vLLM weight sync
  rewards/   verifiable rewards (math-verify, reasoning-gym scorers)
  trainer/   advantages, old-policy log-probs, the parallel forward/backward, optimizer, checkpoints
  losses/    the vocab-parallel SimKO loss (SIMKO_SPEC.md)
  models/    megatron-core GPTModel from a Hugging Face config, and the HF <-> Megatron weight mapping
  parallel/  process groups from torchrun, CPU shims for megatron-core
"""

__version__ = "0.1.0"
