"""Entry point of the isolated reward worker: `python -m megatron_simko.rewards.worker_main` (see worker.py)."""
from megatron_simko.rewards.worker import _serve

if __name__ == "__main__":
    _serve()
