"""The tree-MDP figure: per method and learning rate, the six modes' probabilities and the mass on non-rewarding
sequences (1 − accuracy, grey on top). Each seed's modes are sorted by probability before the seeds are averaged
(a plain seed mean of p(ACD), …, p(DBA) would show five seeds that each collapse onto a different mode as six
kept modes); the bars are therefore "largest mode, 2nd, …, 6th", seed means."""
from __future__ import annotations

from typing import Dict, Sequence

from megatron_simko.toy.tree_mdp import LEARNING_RATES, MODES


def sorted_mode_means(rows: Sequence[Dict[str, object]], name: str, lr: float) -> tuple[list, float]:
    """(six sorted-mode probabilities, accuracy), means over the seeds of (name, lr)."""
    group = [r for r in rows if r["name"] == name and r["lr"] == lr]
    ranked = [sorted((r[f"p_{m}"] for m in MODES), reverse=True) for r in group]
    means = [sum(col) / len(group) for col in zip(*ranked)]
    return means, sum(r["accuracy"] for r in group) / len(group)


def plot_modes(rows: Sequence[Dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, axes = plt.subplots(len(LEARNING_RATES), 1, figsize=(max(8, 0.55 * len(names)), 4.4 * len(LEARNING_RATES)),
                             squeeze=False)
    colours = plt.get_cmap("viridis")([i / 5 for i in range(6)])
    labels = ["largest mode", "2nd", "3rd", "4th", "5th", "6th"]
    for ax, lr in zip(axes[:, 0], LEARNING_RATES):
        stats = [sorted_mode_means(rows, n, lr) for n in names]
        bottom = [0.0] * len(names)
        for k in range(len(MODES)):
            heights = [s[0][k] for s in stats]
            ax.bar(range(len(names)), heights, bottom=bottom, color=colours[k], label=labels[k])
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.bar(range(len(names)), [1 - b for b in bottom], bottom=bottom, color="0.8", label="no reward (1 − acc.)")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability (seed mean)")
        ax.set_title(f"tree MDP after 150 steps, Adam lr {lr}: each seed's six modes sorted by probability",
                     fontsize=10)
    axes[0, 0].legend(ncol=7, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.28))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
