"""Benchmark results as Markdown, each from its JSON alone (experiments/render_docs.py renders the docs with it).

    python experiments/bench_summary.py A.json B.json          # one line per `depthmix bench mod --json` result
    python experiments/bench_summary.py --steps S0.json S1.json  # a table: each fusion step's ratios, in order
    python experiments/bench_summary.py --latency latency.json   # the `depthmix bench latency` table
    python experiments/bench_summary.py --ops OPS0.json OPS1.json  # `depthmix bench ops`: MoD's extra calls, in order
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def line(path: Path) -> str:
    r = json.loads(path.read_text())
    ceiling = r["decode_ceiling"]["weights"]
    decode = r["decode_tokens_per_s_ratio"]
    return (f"- **MoD speed** (`{path.name}`: {r['model']}, {r['device']}, batch {r['batch_size']} x {r['seq_len']}, "
            f"capacity {r['capacity']}): a forward pass {r['forward_time_ratio']:.3f}x dense for "
            f"{r['flop_ratio']:.3f}x the FLOPs, a training step {r['train_step_time_ratio']:.3f}x for "
            f"{r['train_flop_ratio']:.3f}x, decoding {decode:.2f}x the tokens/s at batch 1 "
            f"({decode / ceiling:.0%} of the weights-read ceiling of {ceiling:.2f}x).")


def ratio(r: dict, key: str) -> str:
    s = r["spreads"][key]
    return f"{s['median']:.3f} ({s['iqr'][0]:.3f}-{s['iqr'][1]:.3f})"


def steps(paths: list[Path]) -> str:
    """One row per bench JSON (a code version, at a shape): time ratios with their IQR against the FLOP ratios,
    and the targets of issue 26 (forward <= 1.02x its FLOP ratio, training step <= 1.05x, decoding >= 0.95x the
    weights-read ceiling at batch 1)."""
    rows = ["| run | shape | forward (IQR) | / FLOP ratio | training step (IQR) | / FLOP ratio | decode b1 (IQR) "
            "| / ceiling |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in paths:
        r = json.loads(path.read_text())
        ceiling = r["decode_ceiling"]["weights"]
        rows.append(f"| `{path.stem}` | {r['batch_size']} x {r['seq_len']} | {ratio(r, 'forward_time_ratio')} | "
                    f"{r['forward_time_ratio'] / r['flop_ratio']:.3f} | {ratio(r, 'train_step_time_ratio')} | "
                    f"{r['train_step_time_ratio'] / r['train_flop_ratio']:.3f} | "
                    f"{ratio(r, 'decode_tokens_per_s_ratio')} | {r['decode_tokens_per_s_ratio'] / ceiling:.3f} |")
    return "\n".join(rows)


def latency(path: Path) -> str:
    r = json.loads(path.read_text())
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    rows = [f"`{path.name}`: MoD / dense, {r['model']} on {r['device_name']} ({r['dtype']}), capacity {r['capacity']}, "
            f"{len(r['layers'])} routed blocks (skip {r['skip']})", "",
            "| prompt | batch | prefill speed-up (IQR) | ceiling | 1 / counted FLOP ratio | decode speed-up (IQR) "
            "| ceiling | memory a call adds | realized capacity (decode) |", "| --- " * 9 + "|"]
    for c in r["cells"]:
        pre, dec = (c["spreads"][k] for k in ("prefill_time_ratio", "decode_tokens_per_s_ratio"))
        # the prefill spread is of the time ratio: its speed-up's IQR is the inverse, upper and lower swapped
        pre = "" if pre["median"] is None else f" ({1 / pre['iqr'][1]:.2f}-{1 / pre['iqr'][0]:.2f})"
        dec = "" if dec["median"] is None else f" ({dec['iqr'][0]:.2f}-{dec['iqr'][1]:.2f})"
        rows.append(f"| {c['prompt_len']} | {c['batch']} | {fmt(c['prefill_speedup'])}{pre} | "
                    f"{c['prefill_ceiling']:.2f}x | {1 / c['prefill_flop_ratio']:.2f}x | "
                    f"{fmt(c['decode_tokens_per_s_ratio'])}{dec} | {c['decode_ceiling']:.2f}x | "
                    f"{fmt(c['peak_memory_ratio'])} | {c['realized_capacity']['decode']:.3f} |")
    for s in r["skipped"]:
        rows.append(f"| {s['prompt_len']} | {s['batch']} | skipped: {s['why']} |" + " |" * 6)
    return "\n".join(rows)


def ops(paths: list[Path]) -> str:
    """Per phase: the dense model's aten calls, then MoD's extra calls (MoD - dense) in each file, and the change
    from the first file to the last."""
    runs = [json.loads(path.read_text()) for path in paths]
    rows = ["| phase | dense | " + " | ".join(f"MoD - dense, `{path.stem}`" for path in paths) + " | change |",
            "| --- " * (len(paths) + 3) + "|"]
    for phase, dense in runs[0]["counts"]["dense"].items():
        extra = [r["mod_minus_dense"][phase] for r in runs]
        rows.append(f"| {phase} | {dense:,} | " + " | ".join(f"{e:,}" for e in extra)
                    + f" | {(extra[-1] - extra[0]) / extra[0]:+.0%} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="bench JSON files, in this order")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--steps", action="store_true", help="a table of `bench mod` results (fusion steps)")
    kind.add_argument("--latency", action="store_true", help="the table of a `bench latency` result")
    kind.add_argument("--ops", action="store_true", help="a table of `bench ops` results (code versions)")
    args = p.parse_args()
    if args.steps:
        print(steps(args.results))
    elif args.ops:
        print(ops(args.results))
    elif args.latency:
        print("\n\n".join(latency(path) for path in args.results))
    else:
        for path in args.results:
            print(line(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
