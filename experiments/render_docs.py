"""Fill the generated blocks of the results docs from the experiments' JSON, so no number in them is typed.

A block in docs/*.md is

    <!-- begin: python experiments/mod_retrofit.py --table -->
    ...whatever that command prints (it reads docs/results/*.json)...
    <!-- end -->

    python experiments/render_docs.py            # rewrite every block
    python experiments/render_docs.py --check    # exit 1 (naming the block) if a doc is out of date with its JSON
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- begin: (python experiments/[\w.]+\.py[^>]*?) -->\n)(.*?)(<!-- end -->)", re.S)


def output(command: str) -> str:
    args = shlex.split(command)
    done = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{command}` failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip() + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + output(m.group(2)) + m.group(4), text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="report out-of-date docs instead of rewriting them")
    p.add_argument("docs", nargs="*", type=Path, help="Markdown files (default: docs/*.md)")
    args = p.parse_args()
    stale = []
    for doc in args.docs or sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        new = render(text)
        if new == text:
            continue
        stale.append(doc)
        if not args.check:
            tmp = doc.with_suffix(".md.tmp")
            tmp.write_text(new)
            tmp.replace(doc)
            print(f"rendered {doc}")
    if args.check and stale:
        print("out of date with their JSON (run python experiments/render_docs.py): "
              + ", ".join(str(d) for d in stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
