"""The paper's didactic toy (v3 §4.3, docs/casp.md): run the declared grid and print the table.

    python examples/tree_mdp.py                      # the whole grid, 2 worker processes
    python examples/tree_mdp.py --out docs/casp_toy  # also results.json, table.md and the figure
    python examples/tree_mdp.py --quick              # one seed, one learning rate (a smoke run)
    python examples/tree_mdp.py --out docs/casp_toy --plot-only   # redraw the figure from results.json
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_simko.toy import tree_mdp  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--quick", action="store_true", help="seed 0 and the first learning rate only")
    p.add_argument("--out", default=None, help="directory for results.json, table.md and tree_mdp.png")
    p.add_argument("--plot-only", action="store_true", help="redraw OUT/tree_mdp.png from OUT/results.json")
    a = p.parse_args()
    if a.plot_only:
        from megatron_simko.toy.figure import plot_modes

        with open(os.path.join(a.out, "results.json")) as f:
            plot_modes(json.load(f)["final"], os.path.join(a.out, "tree_mdp.png"))
        return 0
    runs = tree_mdp.grid_runs(a.steps)
    if a.quick:
        runs = [r for r in runs if r.seed == 0 and r.lr == tree_mdp.LEARNING_RATES[0]]
    t = time.time()
    rows = tree_mdp.run_grid(runs, a.workers)
    table = tree_mdp.format_table(rows)
    print(table)
    print(f"{len(runs)} runs in {time.time() - t:.0f} s")
    if a.out:
        from megatron_simko.toy.figure import plot_modes

        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"runs": [tree_mdp.run_as_dict(r) for r in runs], "final": rows}, f, indent=1)
        with open(os.path.join(a.out, "table.md"), "w") as f:
            f.write(table + "\n")
        plot_modes(rows, os.path.join(a.out, "tree_mdp.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
