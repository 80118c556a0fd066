"""The GPU smoke run (``bash tools/gpu_smoke.sh``, docs/gpu_smoke.md): the RL loop end to end on one device,
checked. ``build``: data, tokenizer, model and SFT warm start; ``stages``: subprocesses and in-process stages
under time limits, pre-flight, summary; ``check``: the run, its table and checks (``run_smoke``).
"""
