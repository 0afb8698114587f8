"""depthmix bench <method>: speed and memory ratios measured side by side in one run."""
from __future__ import annotations

import inspect
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a method against its baseline, side by side",
                       description="Times a method and its baseline in alternating rounds in one process and reports "
                       "their ratios (time, FLOPs counted on what really runs, peak memory) with the spread of the "
                       "time ratios. One sub-command per method; `depthmix bench METHOD --help` lists its flags.")
    kinds = p.add_subparsers(dest="bench", required=True, title="benchmarks", metavar="METHOD")
    from ..bench import BENCHES
    for name, (add_args, _) in BENCHES.items():
        doc = (inspect.getdoc(sys.modules[add_args.__module__]) or "").replace("%", "%%")
        b = kinds.add_parser(name, help=" ".join(doc.split("\n\n")[0].split()), description=doc)
        b.add_argument("--json", action="store_true", help="print one JSON object last")
        add_args(b)
        b.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from ..bench import BENCHES
    result = BENCHES[args.bench][1](args)
    if args.json:
        print(json.dumps(result))
    return 0
