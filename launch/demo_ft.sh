#!/usr/bin/env bash
# `make demo-ft`: the demo's two groups as two separate jobs that meet through a torchft Lighthouse
# (codistill.transport=torchft). Each job is an ordinary torchrun launch with its own world of 2
# ranks (ZeRO-3 over all of it), its own run dir and its own checkpoints; kill one and the other
# trains on alone (try `kill -9` on a group's processes while it runs, then start it again with
# --resume: it rejoins at the next exchange round).
#
#   launch/demo_ft.sh [RUN_ROOT] [extra --set overrides...]
#
# On a cluster: run `codistill-ds lighthouse --port 29510` on one host, then on each group's
# nodes the same torchrun line with its own codistill.group_id and the Lighthouse's URL.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/demo-ft}
shift || true
PY=${PY:-.venv/bin/python}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
PORT=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
mkdir -p "$ROOT"

$PY -m codistill_ds.cli lighthouse --port "$PORT" --bind 127.0.0.1 > "$ROOT/lighthouse.log" 2>&1 &
LIGHTHOUSE=$!
pids=()
cleanup() { kill "${pids[@]}" "$LIGHTHOUSE" 2>/dev/null || true; }
trap cleanup EXIT

for g in 0 1; do
  $PY -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$((PORT + 1 + g))" \
    -m codistill_ds.cli train --config examples/tiny_cpu.yaml --run-dir "$ROOT/group$g" \
    --set codistill.transport=torchft codistill.group_id=$g codistill.lighthouse=http://127.0.0.1:$PORT "$@" \
    > "$ROOT/group$g.log" 2>&1 &
  pids+=($!)
  echo "group $g: pid $!, log $ROOT/group$g.log, run dir $ROOT/group$g"
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=$?; echo "group $i failed (exit $status): see $ROOT/group$i.log"; }
done
for g in 0 1; do grep -A 4 "^group" "$ROOT/group$g.log" | head -4; done
exit $status
