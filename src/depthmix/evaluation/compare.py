"""Comparing arms of an experiment over paired seeds: the summary, the paired differences against a baseline, and
the smallest difference the experiment could have detected. Experiments write this dict as their results JSON."""
from __future__ import annotations

import math
import statistics


def compare(experiment: str, task: str, metric: str, higher_is_better: bool, baseline: str, runs: list[dict],
            setup: dict, controls: tuple[tuple[str, str], ...] = ()) -> dict:
    """runs: one dict per finished run with at least "arm", "seed" and "value". Differences are arm - baseline on
    the seeds both arms finished; "power" is the paired t-test's view of them (two-sided, alpha 0.05). controls:
    (arm, reference) pairs tested the same way beside the baseline, e.g. a method against its ablation; they go
    to "controls" and their verdicts to "verdicts" under "<arm> vs <reference>"."""
    arms = sorted({r["arm"] for r in runs}, key=lambda a: (a != baseline, a))
    values = {a: {r["seed"]: r["value"] for r in runs if r["arm"] == a} for a in arms}
    summary = {a: _mean_std(list(v.values())) for a, v in values.items()}
    paired, extra, verdicts = {}, {}, {}
    for arm in arms:
        if arm != baseline and baseline in values:
            paired[arm] = paired_seeds(values[arm], values[baseline])
            verdicts[arm] = verdict(arm, baseline, paired[arm], higher_is_better)
    for arm, ref in controls:
        if arm in values and ref in values:
            key = f"{arm} vs {ref}"
            extra[key] = paired_seeds(values[arm], values[ref])
            verdicts[key] = verdict(arm, ref, extra[key], higher_is_better)
    result = {"experiment": experiment, "task": task, "metric": metric, "higher_is_better": higher_is_better,
              "baseline": baseline, "runs": runs, "summary": summary, "paired": paired, "verdicts": verdicts,
              "setup": setup}
    if controls:
        result["controls"] = extra
    return result


def paired_seeds(values: dict, reference: dict) -> dict:
    """paired_test of values - reference ({seed: value} each) on the seeds both have, with those seeds."""
    seeds = sorted(set(values) & set(reference))
    return {**paired_test([values[s] - reference[s] for s in seeds]), "seeds": seeds}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def paired_test(diffs: list[float], alpha: float = 0.05, power: float = 0.8) -> dict:
    """Mean and s.d. of paired differences, their 95% CI, the t-test p-value and the minimum detectable effect:
    the true mean difference this many pairs would detect with the given power, (t_{1-a/2} + t_{power}) sd / sqrt(n)."""
    from scipy import stats
    n = len(diffs)
    out = {"mean_diff": statistics.fmean(diffs) if n else None, "sd_diff": None, "n": n, "ci95": None,
           "p_value": None, "min_detectable_diff": None}
    if n < 2:
        return out
    sd = statistics.stdev(diffs)
    out["sd_diff"] = sd
    if sd <= 1e-9 * max(map(abs, diffs)):  # equal up to rounding (k/n - j/n in floating point)
        # Equal differences (a discrete metric: two seeds one passage apart each) do not show that the noise is
        # zero, only that these few seeds did not show it: a t-test here would claim p = 0 and a CI of one point.
        return out
    se = sd / math.sqrt(n)
    t = stats.t.ppf(1 - alpha / 2, n - 1)
    out.update(ci95=[out["mean_diff"] - t * se, out["mean_diff"] + t * se],
               min_detectable_diff=(t + stats.t.ppf(power, n - 1)) * se,
               p_value=float(stats.ttest_1samp(diffs, 0.0).pvalue))
    return out


def verdict(arm: str, baseline: str, p: dict, higher_is_better: bool) -> str:
    if p["n"] < 2:
        return f"{arm} vs {baseline}: {p['n']} paired seed(s), no test possible"
    if p["ci95"] is None:
        return (f"{arm} vs {baseline}: all {p['n']} paired differences are {p['mean_diff']:+.4g}, so their spread "
                "cannot be estimated: no test possible yet")
    lo, hi = p["ci95"]
    detect = f"smallest detectable difference {p['min_detectable_diff']:.4g} ({p['n']} paired seeds)"
    if lo <= 0 <= hi:
        return f"{arm} vs {baseline}: no difference detectable at this scale (mean {p['mean_diff']:+.4g}, " \
               f"95% CI [{lo:.4g}, {hi:.4g}]; {detect})"
    better = (p["mean_diff"] > 0) == higher_is_better
    return f"{arm} {'beats' if better else 'loses to'} {baseline} by {p['mean_diff']:+.4g} (95% CI [{lo:.4g}, " \
           f"{hi:.4g}], p = {p['p_value']:.3g}; {detect})"


def table(result: dict) -> str:
    """A Markdown table of one comparison (what the results docs render from the JSON)."""
    lines = [f"| arm | {result['metric']} (mean ± s.d., n) | paired diff vs {result['baseline']} (95% CI) | "
             "smallest detectable |", "| --- | --- | --- | --- |"]
    for arm, s in result["summary"].items():
        sd = f" ± {s['std']:.4f}" if s["std"] is not None else ""
        p = result["paired"].get(arm)
        diff = detect = "—"
        if p and p["ci95"]:
            diff = f"{p['mean_diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
            detect = f"{p['min_detectable_diff']:.4f}"
        lines.append(f"| {arm} | {s['mean']:.4f}{sd} (n={s['n']}) | {diff} | {detect} |")
    return "\n".join(lines)
