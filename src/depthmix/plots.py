"""Pictures: loss curves, the layer-choice heat map, routing weights per layer, paired-seed comparisons."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig, path) -> Path:
    """Write a figure as a PNG (creating its folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curve(log_history: list[dict], path, title: str = "training loss", curves: dict | None = None) -> Path | None:
    """One curve from a Trainer log history, or several: curves = {label: log_history}.

    A history with no logged loss (a run shorter than its logging interval) draws nothing: the function says so
    and returns None instead of writing an empty picture."""
    curves = curves or {"train": log_history}
    points = {label: [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
              for label, history in curves.items()}
    if not any(points.values()):
        print(f"{path} not drawn: no training loss was logged (the run ended before its first logging step; "
              "a smaller --logging-steps logs sooner)")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in points.items():
        if pts:  # markers: a short run logs one or two losses, and a lone point draws no line
            ax.plot(*zip(*pts), marker="o" if len(pts) <= 50 else None, ms=6 if len(pts) < 5 else 3, label=label)
    last = max(h["step"] for history in curves.values() for h in history if "step" in h)
    ax.set_xlim(0, last * 1.03 + 0.5)  # the whole run: a lone point is not the middle of a zoomed-in axis
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if ax.get_lines():
        ax.legend()
    return save(fig, path)


def routing_heatmap(counts, layers: list[int], path, title: str = "layer choice") -> Path:
    """counts[i, j]: how often layer j was picked as the expert of layer layers[i]; rows are normalised."""
    counts = np.asarray(counts, dtype=float)
    freq = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * counts.shape[1], 1.0 + 0.45 * counts.shape[0]))
    im = ax.imshow(freq, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_yticks(range(len(layers)), [str(t) for t in layers])
    ax.set_xlabel("expert layer j")
    ax.set_ylabel("layer t")
    ax.set_title(title)
    for i in range(freq.shape[0]):
        for j in range(freq.shape[1]):
            if freq[i, j] >= 0.005:
                ax.text(j, i, f"{freq[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if freq[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of sequences")
    return save(fig, path)


def layer_weights(results: dict[str, tuple], layers: list[int], path, title: str = "routing weights") -> Path:
    """Grouped bars of the mean routing weight of each ensembled layer: results = {label: (means, stds)}, each
    a sequence over `layers` (stds: error bars, e.g. over seeds)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.9 * len(layers) * max(1, len(results)) / 2), 3.6))
    width = 0.8 / max(1, len(results))
    x = np.arange(len(layers))
    for i, (label, (means, stds)) in enumerate(results.items()):
        pos = x + (i - (len(results) - 1) / 2) * width
        ax.bar(pos, means, width, yerr=stds, capsize=3, label=label, color=plt.cm.tab10(i))
        for xi, m in zip(pos, means):
            ax.annotate(f"{m:.3g}", (xi, m), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"block {t}" + (" (final)" if j == len(layers) - 1 else "") for j, t in enumerate(layers)])
    ax.set_ylabel("mean routing weight")
    # a log axis: weights of 1e-3 next to 0.99 are the typical picture, and the small ones are the story
    smallest = min(min(means) for means, _ in results.values())
    ax.set_yscale("log")
    ax.set_ylim(10 ** np.floor(np.log10(max(smallest, 1e-6))), 1.5)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save(fig, path)


def paired(result: dict, path) -> Path:
    """A comparison over paired seeds (depthmix.evaluation.compare): left, every run's value by arm, each seed's runs
    joined by a line; right, each arm's mean difference from the baseline with its 95% CI, over a grey band of
    +- the smallest difference the seeds could detect."""
    arms = list(result["summary"])
    seeds = sorted({r["seed"] for r in result["runs"]})
    value = {(r["arm"], r["seed"]): r["value"] for r in result["runs"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(3.0 + 2.4 * len(arms), 4.6), layout="constrained",
                                      width_ratios=[len(arms), max(1, len(arms) - 1)])
    for i, seed in enumerate(seeds):
        pts = [(x, value[(a, seed)]) for x, a in enumerate(arms) if (a, seed) in value]
        left.plot(*zip(*pts), "o-", color=plt.cm.tab10(i % 10), alpha=0.7, ms=4, lw=1, label=f"seed {seed}")
    for x, a in enumerate(arms):
        left.hlines(result["summary"][a]["mean"], x - 0.25, x + 0.25, color="black", lw=2)
    left.set_xticks(range(len(arms)), [wrapped(a) for a in arms], fontsize=8)
    left.set_xlim(-0.5, len(arms) - 0.5)
    better = "higher" if result["higher_is_better"] else "lower"
    left.set_ylabel(textwrap.fill(f"{result['metric']} ({better} is better)", 40), fontsize=9)
    fig.suptitle(f"{result['task']}: {len(seeds)} paired seed(s)", fontsize=10)
    if len(seeds) <= 10:  # above the runs, in rows, not over them
        left.legend(fontsize=7, ncol=min(len(seeds), 5), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                    frameon=False)
    _differences(right, {a: result["paired"][a] for a in arms if a in result["paired"]})
    right.set_ylabel(textwrap.fill(f"paired difference vs {result['baseline']}", 32), fontsize=9)
    if right.get_legend() is not None:
        right.legend(fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return save(fig, path)


def wrapped(name: str, width: int = 14) -> str:
    """A tick label on lines of at most `width` characters (broken at hyphens and spaces): long arm names side by
    side would run into each other."""
    return textwrap.fill(name, width, break_on_hyphens=True)


def differences(paired: dict[str, dict], path, ylabel: str, title: str) -> Path:
    """Several paired comparisons side by side: paired = {label: paired_test(...)}."""
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(paired), 4))
    _differences(ax, paired)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def _differences(ax, paired: dict[str, dict]) -> None:
    """Each mean paired difference with its 95% CI, over a grey band of +- the smallest detectable difference."""
    for x, (label, p) in enumerate(paired.items()):
        if p["ci95"] is None:
            ax.plot([x], [p["mean_diff"]], "o", color="gray")
            continue
        mdd = p["min_detectable_diff"]
        ax.bar(x, 2 * mdd, bottom=-mdd, width=0.5, color="lightgray",
               label="± smallest detectable" if x == 0 else None)
        lo, hi = p["ci95"]
        ax.errorbar([x], [p["mean_diff"]], yerr=[[p["mean_diff"] - lo], [hi - p["mean_diff"]]], fmt="o",
                    color="black", capsize=5, label="mean, 95% CI" if x == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.08)
    ax.set_xticks(range(len(paired)), [wrapped(name) for name in paired], fontsize=8)
    ax.set_xlim(-0.6, len(paired) - 0.4)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def speedup_lines(result: dict, path) -> Path:
    """`depthmix bench latency`: decoding and prefill speed-up over dense against batch size, one line per prompt
    length, each with its analytic ceiling dotted."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lengths = sorted({c["prompt_len"] for c in result["cells"]})
    for ax, key, ceiling, title in ((axes[0], "decode_tokens_per_s_ratio", "decode_ceiling", "decoding tokens/s"),
                                    (axes[1], "prefill_speedup", "prefill_ceiling", "prefill (time to first token)")):
        for p in lengths:
            cells = sorted((c for c in result["cells"] if c["prompt_len"] == p and c[key] is not None),
                           key=lambda c: c["batch"])
            if not cells:
                continue
            line, = ax.plot([c["batch"] for c in cells], [c[key] for c in cells], marker="o",
                            label=f"prompt {p}")
            ax.plot([c["batch"] for c in cells], [c[ceiling] for c in cells], ls=":", color=line.get_color())
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        batches = sorted({c["batch"] for c in result["cells"]})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up over dense (dotted: ceiling)")
        ax.set_title(title)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(f"MoD capacity {result['capacity']} on {len(result['layers'])} blocks, {result['model']}, "
                 f"{result['device_name']} {result['dtype']}", fontsize=9)
    return save(fig, path)
