#!/usr/bin/env bash
# DeepSpeed ZeRO batches on the lent 2x H200, from the repository root, with .whl carried:
#   DEADLINE=<s> bash data/calibration/device-run-zero.sh data/calibration/plans/<batch>.json [...]
# The device has no registry: it installs the carried bitsandbytes wheel (.whl/*.whl) and DeepSpeed 0.19.6
# with the dependencies the image lacks (.whl/zero/*.whl: deepspeed built from its sdist with
# DS_BUILD_OPS=0, hjson, pydantic, pydantic-core, annotated-types, typing-inspection), prints the stack,
# runs the tiny ZeRO smoke plan, then each plan; JSONL and logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on these machines (the device's KINDS.md): NCCL, PyTorch and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/tunefit-out}
DEADLINE=${DEADLINE:-400}
START=$(date +%s)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl/zero/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
python3 -c "import sys,torch,transformers,peft,bitsandbytes,deepspeed,pynvml; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, bitsandbytes.__version__, deepspeed.__version__, torch.cuda.device_count())"

all_ok() { python3 -c "import json,sys; L=[json.loads(x) for x in open(sys.argv[1])]; bad=[l for l in L if l['status']!='ok']; [print(l.get('error'), l.get('traceback','')) for l in bad]; sys.exit(1 if bad or not L else 0)" "$1"; }

python3 -m app.measure --plan data/calibration/plans/smoke-zero.json --device cuda --run-timeout-s 120 \
  --out "$OUT/smoke-zero.jsonl" >"$OUT/smoke-zero.log" 2>&1
if ! all_ok "$OUT/smoke-zero.jsonl"; then
  grep -vE "^\s*$|\[INFO\]" "$OUT/smoke-zero.log" | tail -60
  exit 1
fi
echo "smoke ok after $(( $(date +%s) - START )) s"
for plan in "$@"; do
  name=$(basename "$plan" .json)
  left=$(( DEADLINE - ($(date +%s) - START) ))
  [ "$left" -gt 30 ] || { echo "no time left for $name"; continue; }
  # --deadline-s: no run starts after it; runs already committed for this batch are skipped.
  python3 -m app.measure --plan "$plan" --device cuda --deadline-s "$left" --run-timeout-s 200 \
    --skip-done "data/calibration/h200-$name.jsonl" --out "$OUT/h200-$name.jsonl" >"$OUT/log-$name.txt" 2>&1
  grep -E '^(batch|checkpoint|deadline|totals)|  (ok|oom|error) ' "$OUT/log-$name.txt" | cut -c1-220
done
echo "done after $(( $(date +%s) - START )) s"
