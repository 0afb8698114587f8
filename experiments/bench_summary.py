"""One line per `depthmix bench mod --json` result: its ratios, each line from one run's JSON alone.

    python experiments/bench_summary.py docs/results/bench-mod-cpu-decode-step.json docs/results/bench-mod-cpu.json

docs/design.md renders its MoD speed lines with it (experiments/render_docs.py), so no number there is typed.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="bench JSON files, one line each, in this order")
    for path in p.parse_args().results:
        print(line(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
