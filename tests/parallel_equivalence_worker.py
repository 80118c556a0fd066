"""torchrun worker for tests/test_parallel_equivalence.py: several cases of tools/check_parallel_equivalence.py
(same world size) in one launch, each exactly as the tool runs it — the harness's reference and worker phases
(megatron_simko/parallel/equivalence.py) — so the suite pays one process start and import per world size.

    torchrun --nproc-per-node W tests/parallel_equivalence_worker.py --cases cases.json --dir DIR

cases.json: a list of the tool's argument lists (without --json). Rank 0 computes every case's single-device
reference first (a private one-process group, before this job's world group exists, as the tool does); then
every rank runs the cases' parallel phases in order, the world group kept between them and megatron-core's
model-parallel groups rebuilt for each. Case i's result is DIR/case_i.json (the tool's JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

from check_parallel_equivalence import parse_args  # noqa: E402

from megatron_simko.parallel import destroy_parallel, equivalence  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    with open(args.cases, encoding="utf-8") as f:
        cases = [parse_args([*argv, "--worker", "--reference", os.path.join(args.dir, f"reference_{i}.pt"),
                             "--json", os.path.join(args.dir, f"case_{i}.json")])
                 for i, argv in enumerate(json.load(f))]
    world = int(os.environ["WORLD_SIZE"])
    for case in cases:
        equivalence.validate(case)
        ranks = case.tp * case.pp * case.dp
        assert ranks == world, f"a case of {ranks} ranks in a launch of {world}"
    if int(os.environ["RANK"]) == 0:  # the other ranks wait for the world group meanwhile
        for case in cases:
            equivalence.reference(case, equivalence.make_arch(case), case.reference)
    for case in cases:
        equivalence.worker(case, with_reference=False, keep_process_group=True)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
