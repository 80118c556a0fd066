"""Evaluation: the unbiased pass@k estimator (passk), n-sample evaluation of models on benchmarks with vLLM
(evaluate), the files it writes and reads (results), and the study's figures (plots)."""
from .passk import default_ks, format_table, pass_at_k, pass_at_k_curve, pass_at_k_table

__all__ = ["default_ks", "format_table", "pass_at_k", "pass_at_k_curve", "pass_at_k_table"]
