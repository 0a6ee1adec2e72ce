#!/usr/bin/env bash
# The GPU measurements still open on the issues, in priority order, in one device call of at most ROUND_S
# seconds (default 560): each step gets what is left of it, and everything measured so far is merged every 15 s
# into $OUT/gpu_round.json (one JSON object: file name under the step's folder -> that file's content).
#   1. [scale] 8B at Unsloth's peaks, B1 x 2048, dropout 0, paged AdamW, planned 2% under Unsloth's torch peak
#   2. [scale] the 70B estimator grid (memory_estimate.py measure; compare it here with `compare`)
#   3. [house] the torch.compile check of a fused decoder layer (graph breaks, compiled vs eager)
#   4. [house] train_step at 1x512 and 4x2048: $PREV (an export of the commit before the custom ops, e.g.
#      `mkdir .prev && git archive d9ec941 src benchmarks | tar -x -C .prev`) against this tree, same call
#   5. [align] DPO against TRL with the planner's setting within TRL's peaks
#   6. [house] continuous batching's slot step, CUDA graph vs eager
# Needs the peers' wheels installed first (benchmarks/peers.py says which), e.g. with the device tool:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:$PWD/src
set -u
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_round.sh: needs a CUDA GPU, and torch sees none"; exit 1
fi
END=$(( $(date +%s) + ${ROUND_S:-560} ))
PREV=${PREV:-.prev}
WORK=$(mktemp -d)
OUT=${OUT:-benchmarks/results}
merge() {
  python3 - "$WORK" "$OUT/gpu_round.json" <<'PY'
import json, pathlib, sys
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rec = {}
for p in sorted(root.rglob("*.json")):
    try:
        rec[str(p.relative_to(root))] = json.loads(p.read_text())
    except ValueError as err:
        rec[str(p.relative_to(root))] = {"unreadable": str(err)}
out.write_text(json.dumps(rec, indent=1) + "\n")
PY
}
cap() { local left=$(( END - $(date +%s) )); if [ "$left" -lt 20 ]; then echo 1; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi; }
step() { echo "== $1 $(date +%T)"; }
nvidia-smi --query-gpu=name,memory.used,driver_version --format=csv,noheader
( while sleep 15; do merge; done ) & WATCH=$!
step "B1 at Unsloth's peaks"
timeout "$(cap 170)" python3 benchmarks/train_step.py --batches 1x2048 --dropout 0 --optimizer paged_adamw_32bit \
  --budget-from-peer unsloth --steps 12 --out "$WORK/b1" 2>&1 | grep -v '^\s*$' | tail -8
step "70B estimator grid"
timeout "$(cap 170)" python3 benchmarks/memory_estimate.py measure --shape llama2-70b --steps 2 --out "$WORK/grid" \
  --only 1x512-keep,1x512-offload,1x512-recompute,1x2048-offload,1x2048-recompute,4x2048-offload,4x2048-recompute,\
1x8192-offload,1x8192-recompute,4x512-offload,4x512-recompute,4x8192-offload,4x512-keep,1x2048-keep,1x2048-host-lean \
  2>&1 | grep -v Warning | tail -17
step "compile check"
timeout "$(cap 90)" python3 benchmarks/compile_check.py --out "$WORK/cc" --layers 2 2>&1 | tail -14
step "custom ops: before ($PREV) and now"
if [ -d "$PREV/src" ]; then
  PYTHONPATH="/tmp/site:$PWD/$PREV/src" timeout "$(cap 60)" python3 "$PREV/benchmarks/train_step.py" \
    --batches 1x512,4x2048 --steps 12 --out "$WORK/prev" 2>&1 | tail -3
  timeout "$(cap 60)" python3 benchmarks/train_step.py --batches 1x512,4x2048 --steps 12 --out "$WORK/now" 2>&1 | tail -3
else
  echo "no $PREV/src: the before/after timing is skipped"
fi
step "DPO against TRL"
timeout "$(cap 150)" python3 benchmarks/dpo_step.py --out "$WORK/dpo" --keep 0 --budget-from-peer \
  --adapter-dtype bfloat16 --steps 8 2>&1 | grep -v '^\s*$' | tail -12
step "slot step"
timeout "$(cap 45)" python3 benchmarks/serve_slots_check.py --out "$WORK/ss" 2>&1 | tail -6
kill "$WATCH"; merge; step done
