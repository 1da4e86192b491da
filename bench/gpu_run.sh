#!/usr/bin/env bash
# The GPU evidence run (issue: the step-time model checked on a real H200) in one command.
# Needs only python3 with torch and CUDA (no SGLang, no network); under 6 minutes on an H200.
#
#   bash bench/gpu_run.sh prepare   # here, once: the trace data into .gpu_data/ (in .gitignore)
#   bash bench/gpu_run.sh           # on the GPU machine (carry .gpu_data): JSON + log under $OUT
#   PYTHON=.venv/bin/python GPU_EVIDENCE_ARGS=--tiny OUT=/tmp/x bash bench/gpu_run.sh   # the same on a CPU
#
# Then copy $OUT/gpu_evidence.json and gpu_evidence.log into bench/results/ and commit them:
# the `h200-measured` hardware preset and interference setting read that JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
    src="${BLENDSERVE_DATA:-../shared/data}"
    [ -d "$src/traces" ] && [ -d "$src/mmlu" ] || { echo "no trace data at $src: set BLENDSERVE_DATA" >&2; exit 2; }
    rm -rf .gpu_data && mkdir -p .gpu_data && cp -r "$src"/. .gpu_data/
    echo "trace data in .gpu_data ($(du -sh .gpu_data | cut -f1)); name .gpu_data in the run's carry"
    exit 0
fi
out="${OUT:-bench/results}"
mkdir -p "$out"
export BLENDSERVE_DATA="${BLENDSERVE_DATA:-$PWD/.gpu_data}" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/nvidia_smi.csv" 2>&1 || true
set -o pipefail
timeout 480 "${PYTHON:-python3}" bench/gpu_evidence.py --out "$out" ${GPU_EVIDENCE_ARGS:-} 2>&1 | tee "$out/gpu_evidence.stdout"
