"""isoFLOP curves: where a curve has its minimum, and how a result of experiments/mod_isoflop_sizes.py reads (its
PNG and its Markdown in docs/results-mod.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def heldout_nll(entry: dict) -> float:
    """A pretraining run's held-out NLL from its metrics.json "heldout" entry ("loss" in runs written before
    depthmix.evaluation.heldout_nll named it "nll")."""
    return entry["nll"] if "nll" in entry else entry["loss"]


def parabola_min(points: list[tuple[float, float]]) -> dict:
    """points: (params, mean loss) sorted by params. A parabola in log10(params) through the best point and its
    two neighbours; the best point itself where that is not possible."""
    import numpy as np
    i = min(range(len(points)), key=lambda j: points[j][1])
    best = {"params": points[i][0], "loss": points[i][1], "index": i}
    if len(points) < 3:
        return {**best, "method": "best point (fewer than 3 sizes)", "bracketed": False}
    if i in (0, len(points) - 1):
        return {**best, "method": "best point (on the edge of the sweep: minimum not bracketed)", "bracketed": False}
    x = np.log10([points[j][0] for j in (i - 1, i, i + 1)])
    y = [points[j][1] for j in (i - 1, i, i + 1)]
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return {**best, "method": "best point (parabola does not open upwards)", "bracketed": True}
    xv = -b / (2 * a)
    return {"params": float(10 ** xv), "loss": float(c - b * b / (4 * a)), "index": i, "bracketed": True,
            "method": "parabola in log10(params) through the best point and its neighbours"}


def loglog_interp(xs: list[float], ys: list[float], x: float) -> float:
    """y at x, linear in log-log between the measured neighbours (clamped to the ends)."""
    lx = [math.log(v) for v in xs]
    t = math.log(x)
    if t <= lx[0]:
        return ys[0]
    for j in range(1, len(xs)):
        if t <= lx[j]:
            w = (t - lx[j - 1]) / (lx[j] - lx[j - 1])
            return math.exp((1 - w) * math.log(ys[j - 1]) + w * math.log(ys[j]))
    return ys[-1]


def plot(result: dict, path: Path) -> None:
    import matplotlib.ticker
    import numpy as np

    from depthmix.plots import plt, save
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"dense": "tab:blue", "mod": "tab:orange"}
    for family, pts in result["curves"].items():
        xs = [p["params_nonembedding"] for p in pts]
        ax.plot(xs, [p["loss_mean"] for p in pts], "o-", color=colors.get(family), label=f"{family} (mean)")
        seeds = [r for r in result["all_runs"] if r["arm"] == family]
        ax.scatter([r["params_nonembedding"] for r in seeds], [r["value"] for r in seeds], s=10, alpha=0.4,
                   color=colors.get(family))
        m = result["minima"][family]
        fit = m["fit"]
        if fit["method"].startswith("parabola"):
            i = [p["params_nonembedding"] for p in pts].index(m["best_measured"]["params_nonembedding"])
            x3 = np.log10(xs[i - 1:i + 2])
            coef = np.polyfit(x3, [p["loss_mean"] for p in pts[i - 1:i + 2]], 2)
            xx = np.linspace(x3[0], x3[-1], 50)
            ax.plot(10 ** xx, np.polyval(coef, xx), "--", color=colors.get(family), lw=1)
        ax.plot([fit["params"]], [fit["loss"]], "*", ms=12, color=colors.get(family))
    if result.get("controls"):
        ctl = result["controls"]["runs"]
        ax.scatter([r["params_nonembedding"] for r in ctl], [r["value"] for r in ctl], marker="s", s=30,
                   facecolors="none", edgecolors=colors["dense"], label="dense L1 control (per seed)")
    s = result["setup"]
    ax.axvline(s["n_opt"], color="gray", ls=":", lw=1, label="sqrt(C/120)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("held-out loss (nats/byte, causal)")
    ax.set_title(f"isoFLOP {s['budget_label']} FLOPs, {s['corpus']}" + (" (partial)" if s["partial"] else ""))
    ax.legend(fontsize=8)
    save(fig, path)


def markdown(files: list[Path]) -> str:
    from depthmix.evaluation.compare import table
    out = []
    for f in files:
        r = json.loads(f.read_text())
        s = r["setup"]
        ext = f"; edge extension: {', '.join(s['extended'])}" if s.get("extended") else ""
        out.append(f"**{s['corpus']}, {s['budget_label']} training FLOPs** (N_opt = sqrt(C/120) = "
                   f"{s['n_opt'] / 1e3:.0f}k non-embedding parameters; seeds {s['seeds']}{ext}"
                   + ("; **partial: " + ", ".join(s["missing_runs"]) + " missing**" if s["partial"] else "") + ")")
        out.append("")
        out.append("| size | non-emb. params (dense / MoD) | steps (dense / MoD) | dense loss | MoD loss (causal) | "
                   "MoD - dense, paired (95% CI) | FLOPs / forward, dense / MoD | MoD realized capacity (causal) / "
                   "predictor acc. | MoD loss (top-k) |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        by = {fam: {p["shape"]: p for p in pts} for fam, pts in r["curves"].items()}
        for size in [x["shape"] for x in s["sizes"]]:
            d, m = by.get("dense", {}).get(size), by.get("mod", {}).get(size)

            def loss(p):
                if not p:
                    return "—"
                sd = f" ± {p['loss_std']:.4f}" if p["loss_std"] is not None else ""
                return f"{p['loss_mean']:.4f}{sd} (n={p['n']})"
            ps = r["per_size"].get(size)
            diff = "—"
            if ps and ps["n"]:
                diff = f"{ps['mean_diff']:+.4f}" + (f" [{ps['ci95'][0]:+.4f}, {ps['ci95'][1]:+.4f}]"
                                                   if ps["ci95"] else " (1 seed)")
            out.append(f"| {size} | {d['params_nonembedding'] if d else '—':,} / "
                       f"{m['params_nonembedding'] if m else '—':,} | {d['train_steps'] if d else '—'} / "
                       f"{m['train_steps'] if m else '—'} | {loss(d)} | {loss(m)} | {diff} | "
                       f"{d['forward_flops'] / 1e6 if d else float('nan'):.1f}M / "
                       f"{m['forward_flops'] / 1e6 if m else float('nan'):.1f}M | "
                       + (f"{m['realized_capacity']:.3f} / {m['predictor_accuracy']:.3f} | {m['loss_topk_mean']:.4f} |"
                          if m and m.get("realized_capacity") is not None else "— | — |"))
        out.append("")
        for fam, mn in r["minima"].items():
            fit = mn["fit"]
            out.append(f"- {fam} minimum: {fit['loss']:.4f} at {fit['params'] / 1e3:.0f}k params ({fit['method']}); "
                       f"best measured {mn['best_measured']['shape']} ({mn['best_measured']['loss_mean']:.4f}); "
                       f"forward FLOPs per sequence {mn['forward_flops_at_best'] / 1e6:.1f}M at the best size, "
                       f"{mn['forward_flops_at_fit'] / 1e6:.1f}M at the fitted minimum"
                       + ("" if mn["complete"] else " (curve incomplete)"))
        if "dense" in r["minima"] and "mod" in r["minima"]:
            a, b = r["minima"]["mod"], r["minima"]["dense"]
            out.append(f"- MoD / dense at the minima: loss {a['fit']['loss'] - b['fit']['loss']:+.4f}, forward FLOPs "
                       f"{a['forward_flops_at_fit'] / b['forward_flops_at_fit']:.2f}x (fitted), "
                       f"{a['forward_flops_at_best'] / b['forward_flops_at_best']:.2f}x (best measured)")
        out.append("")
        out.append("Loss at each family's best size per seed (paired by seed):")
        out.append("")
        out.append(table(r))
        for v in r["verdicts"].values():
            out.append(f"\n{v}.")
        if r.get("controls"):
            c = r["controls"]
            shapes = sorted({(x["layers"], x["hidden"]) for x in c["runs"]})
            for sh in shapes:
                rs = [x for x in c["runs"] if (x["layers"], x["hidden"]) == sh]
                out.append(f"\nDense control L{sh[0]} d{sh[1]} ({rs[0]['params_nonembedding']:,} non-emb. params, "
                           f"{rs[0]['train_steps']} steps, {rs[0]['forward_flops'] / 1e6:.1f}M FLOPs / forward): "
                           + ", ".join(f"seed {x['seed']} {x['value']:.4f}" for x in rs)
                           + f", mean {sum(x['value'] for x in rs) / len(rs):.4f}.")
            out.append(f"\nWith the controls: {c['verdict']}.")
        out.append("")
        out.append(f"![{s['corpus']} {s['budget_label']}](img/mod-isoflop-{s['corpus']}-{s['budget_label']}.png)")
        out.append("")
    return "\n".join(out)


def verdicts(files: list[Path], path: Path) -> Path | None:
    """Every finished budget's paired difference (MoD - dense at the two minima, per seed) in one picture, and the
    same against ladder + one-block controls where those ran."""
    from depthmix.plots import differences
    paired = {}
    for f in files:
        r = json.loads(f.read_text())
        s = r["setup"]
        if "mod" in r["paired"]:
            paired[f"{s['corpus']} {s['budget_label']}"] = r["paired"]["mod"]
        if r.get("controls"):
            paired[f"{s['corpus']} {s['budget_label']} + controls"] = r["controls"]["paired"]
    if not paired:
        return None
    return differences(paired, path, "MoD - dense at the isoFLOP minima\n(nats/byte, paired by seed)",
                       "MoD vs dense from scratch, isoFLOP")
