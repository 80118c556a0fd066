"""The parallel training step on megatron-core (TP × PP × DP), module by module:

  batch.py          the packed RL batch [B, S] and its micro-batching (equal splits or a token budget)
  model.py          TransformerConfig for training, this rank's GPTModel chunk(s), the DDP wrapper
  step.py           forward/backward through megatron-core's schedules (global token-mean loss),
                    forward-only per-token statistics (old-policy log-probs, entropy, top-K)
  optimizer.py      megatron-core Adam (optionally distributed), clipping, LR schedule, train_step
  checkpointing.py  dist_checkpointing save/load (atomic, reshardable model weights), keep-last-N

Modules import megatron-core lazily; see docs/parallelism.md.
"""
