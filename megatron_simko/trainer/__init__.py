"""The parallel training step on megatron-core (TP × PP × DP), module by module:

  batch.py          the packed RL batch [B, S] and its micro-batching (equal splits or a token budget)
  model.py          TransformerConfig for training, this rank's GPTModel chunk(s), the DDP wrapper
  schedule.py       megatron-core's pipeline schedules over a list of micro-batches (micro-batching, forward step)
  token_stats.py    forward-only per-token statistics (old-policy log-probs, entropy, top-K) and the
                    KL-Cov / Clip-Cov token selection over the mini-batch
  step.py           the training step: forward/backward (global token-mean loss) and train_step (one update)
  optimizer.py      megatron-core Adam (optionally distributed), clipping, LR schedule, non-finite-update guard
  checkpointing.py  dist_checkpointing save/load (atomic, reshardable model weights), keep-last-N

Modules import megatron-core lazily; see docs/parallelism.md.
"""
