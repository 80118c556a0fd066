"""The tree-MDP figure: per method and learning rate, the six modes' probabilities (seed means, stacked) and the
mass left on non-rewarding sequences (1 − accuracy, grey on top)."""
from __future__ import annotations

from typing import Dict, Sequence

from megatron_simko.toy.tree_mdp import LEARNING_RATES, MODES, verdicts


def plot_modes(rows: Sequence[Dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = verdicts(rows)
    names = list(dict.fromkeys(name for name, _ in table))
    fig, axes = plt.subplots(len(LEARNING_RATES), 1, figsize=(max(8, 0.55 * len(names)), 4.2 * len(LEARNING_RATES)),
                             squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, lr in zip(axes[:, 0], LEARNING_RATES):
        bottom = [0.0] * len(names)
        for m_i, m in enumerate(MODES):
            heights = [table[(n, lr)][f"p_{m}"] if (n, lr) in table else 0.0 for n in names]
            ax.bar(range(len(names)), heights, bottom=bottom, color=colours[m_i], label=m)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.bar(range(len(names)), [1 - b for b in bottom], bottom=bottom, color="0.8", label="no reward")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability (mean of seeds)")
        ax.set_title(f"tree MDP: mode probabilities and accuracy (bar height below grey), Adam lr {lr}")
    axes[0, 0].legend(ncol=7, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
