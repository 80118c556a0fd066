"""Evaluation: the unbiased pass@k estimator, and n-sample generation + reward scoring with vLLM."""
from .passk import default_ks, format_table, pass_at_k, pass_at_k_curve, pass_at_k_table

__all__ = ["default_ks", "format_table", "pass_at_k", "pass_at_k_curve", "pass_at_k_table"]
