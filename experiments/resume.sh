#!/usr/bin/env bash
# Continue issue 11's long studies in the background, one core each (each script skips its finished runs and
# resumes a stopped one), so a new session on this 2-core machine needs one command. Two lanes share each study,
# taking its runs from opposite ends (--reverse; each run is trained by the lane that claims it first):
#   lane 1: MoDE on arithmetic, then MoLEx (--reverse)
#   lane 2: MoDE on arithmetic (--reverse), then MoLEx (SST-2 is finished: its runs are read from docs/results;
#           then pydoc/topics)
# The MoD isoFLOP study is complete (experiments/mod_isoflop_sizes.py).
# Runs recorded in docs/results/*.json by an earlier session count as finished (sweeps.recorded): runs/ is not
# committed and does not outlive a session's machine.
# Logs: runs/logs/lane{1,2}-<date>.log. Stop: pkill -f "experiments/|depthmix.cli.main" (the training processes
# too; runs resume where they stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
if pgrep -f "experiments/(mod_isoflop_sizes|mode_math|molex_sst2).py|depthmix.cli.main train" > /dev/null; then
    echo "already running:"; pgrep -af "experiments/(mod_isoflop_sizes|mode_math|molex_sst2).py|depthmix.cli.main train"; exit 1
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 DEPTHMIX_DATA="${DEPTHMIX_DATA:-$(cd .. && pwd)/shared/data}"
mkdir -p runs/logs
stamp=$(date +%m%d-%H%M)
nohup nice -n 10 bash -c 'python experiments/mode_math.py --data-dir "$DEPTHMIX_DATA" --out runs/mode_math &&
    python experiments/molex_sst2.py --out runs/molex_sst2 --reverse' > "runs/logs/lane1-$stamp.log" 2>&1 &
nohup nice -n 10 bash -c 'python experiments/mode_math.py --data-dir "$DEPTHMIX_DATA" --out runs/mode_math --reverse &&
    python experiments/molex_sst2.py --out runs/molex_sst2' > "runs/logs/lane2-$stamp.log" 2>&1 &
echo "started; logs: runs/logs/lane1-$stamp.log, runs/logs/lane2-$stamp.log"
