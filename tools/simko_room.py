"""The room report (megatron_simko/eval/room.py): will SimKO have anything to do for this model on this task?

    python tools/simko_room.py --model runs/toy_study/model --data reasoning_gym/countdown \\
        [--task-config JSON] [--alpha 0.01 --top-k 3 --tau 0.8] [--n-prompts 32 --samples 4 --forks 24 --m 8] \\
        [--protocol paper | --eval-temperature 0.6 --eval-top-p 0.95] --out-dir runs/room

Writes <out-dir>/room.json, room.md (the table and the verdict line) and room.png; prints the table. The task
config and prompt style default to the model folder's tiny_model.json when it was made for the same task. Bad
input is a one-line error, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_simko.cli import json_object  # noqa: E402
from megatron_simko.eval.room import (PROTOCOLS, RoomError, RoomSettings, measure, room_markdown,  # noqa: E402
                                      write_report)


def main(argv=None) -> int:
    d = RoomSettings()
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder (e.g. a run's hf_final)")
    ap.add_argument("--data", required=True, help="reasoning_gym/<task>")
    ap.add_argument("--task-config", help="reasoning-gym options as JSON (default: the model's tiny_model.json)")
    ap.add_argument("--out-dir", required=True)
    for name in ("alpha", "top_k", "tau", "n_prompts", "samples", "forks", "m", "max_new_tokens", "data_seed", "seed",
                 "eval_temperature", "eval_top_p"):
        value = getattr(d, name)
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), help="sets --eval-temperature / --eval-top-p")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    try:
        cfg = json_object(args.task_config, "--task-config", RoomError) if args.task_config else None
        if args.protocol:
            args.eval_temperature, args.eval_top_p = PROTOCOLS[args.protocol]
        settings = RoomSettings(**{k: getattr(args, k) for k in vars(d)})
        import torch

        torch.set_num_threads(args.threads)
        rec = measure(args.model, args.data, settings, cfg)
    except RoomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_report(rec, args.out_dir)
    print(room_markdown(rec))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
