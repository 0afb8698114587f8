"""depthmix bench <method>: speed and memory ratios measured side by side in one run."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a method against its baseline, side by side")
    kinds = p.add_subparsers(dest="bench", required=True)
    from ..bench import BENCHES
    for name, (add_args, _) in BENCHES.items():
        b = kinds.add_parser(name)
        b.add_argument("--json", action="store_true", help="print one JSON object last")
        add_args(b)
        b.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from ..bench import BENCHES
    result = BENCHES[args.bench][1](args)
    if args.json:
        print(json.dumps(result))
    return 0
