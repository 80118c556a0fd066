"""megatron_simko: SimKO (Simple Pass@K Optimization) RLVR training on megatron-core with vLLM rollouts.

One RL step, file by file:
  rollout/   vLLM generation (n samples per prompt) and Megatron -> vLLM weight sync
  rewards/   verifiable rewards (math-verify, reasoning-gym scorers)
  advantages.py, experience.py   GRPO advantages; rollouts + rewards -> the trainer's batch (pack_rollouts)
  trainer/   old-policy log-probs (token_stats), the training step (step: forward_backward, train_step),
             optimizer, checkpoints
  losses/    the vocab-parallel SimKO loss (SIMKO_SPEC.md)
  models/    megatron-core GPTModel from a Hugging Face config, and the HF <-> Megatron weight mapping
  parallel/  process groups from torchrun, CPU shims for megatron-core, the TP/PP ≡ one-device harness
  smoke/     the GPU smoke run of the whole loop (tools/gpu_smoke.py)
"""

__version__ = "0.1.0"
