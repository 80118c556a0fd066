"""SimKO losses: the vocab-parallel per-token statistics and the SimKO / GRPO-family policy loss.

    from megatron_simko.losses import SimKOConfig, simko_loss, token_statistics
"""
from .simko import MODES, SimKOConfig, merge_metrics, simko_loss
from .vocab_parallel import TokenStats, token_statistics

__all__ = ["MODES", "SimKOConfig", "TokenStats", "merge_metrics", "simko_loss", "token_statistics"]
