#!/usr/bin/env bash
# The command each calibration batch ran on the lent H200, from the repository root:
#   DEADLINE=<s> bash data/calibration/device-run.sh data/calibration/plans/<batch>.json [...]
# It installs the carried bitsandbytes wheel (.whl/, the device has no registry), prints the stack,
# runs the tiny smoke plan (fork isolation, falling back to spawn), then each plan; JSONL goes to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tunefit-out}
DEADLINE=${DEADLINE:-420}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
df -h /tmp | tail -1
python3 -c "import sys,torch,transformers,peft,bitsandbytes,pynvml; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, bitsandbytes.__version__)"

all_ok() { python3 -c "import json,sys; L=[json.loads(x) for x in open(sys.argv[1])]; bad=[l for l in L if l['status']!='ok']; [print(l.get('error'), l.get('traceback','')) for l in bad]; sys.exit(1 if bad or not L else 0)" "$1"; }

ISO=fork
python3 -m app.measure --plan data/calibration/plans/smoke.json --device cuda --isolation fork --out "$OUT/smoke.jsonl" >"$OUT/smoke.log" 2>&1
if ! all_ok "$OUT/smoke.jsonl"; then
  tail -20 "$OUT/smoke.log"
  ISO=spawn
  python3 -m app.measure --plan data/calibration/plans/smoke.json --device cuda --isolation spawn --out "$OUT/smoke-spawn.jsonl" >>"$OUT/smoke.log" 2>&1
  all_ok "$OUT/smoke-spawn.jsonl" || { tail -40 "$OUT/smoke.log"; exit 1; }
fi
echo "smoke ok, isolation=$ISO"
START=$(date +%s)
for plan in "$@"; do
  name=$(basename "$plan" .json)
  left=$(( DEADLINE - ($(date +%s) - START) ))
  [ "$left" -gt 20 ] || { echo "no time left for $name"; continue; }
  # Runs already committed for this batch (an earlier call that hit its deadline) are skipped.
  python3 -m app.measure --plan "$plan" --device cuda --isolation "$ISO" --deadline-s "$left" \
    --skip-done "data/calibration/h200-$name.jsonl" --out "$OUT/h200-$name.jsonl" >"$OUT/log-$name.txt" 2>&1
  grep -E '^(batch|checkpoint|deadline|totals)|  (ok|oom|error) ' "$OUT/log-$name.txt" | cut -c1-200
done
