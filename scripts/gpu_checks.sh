#!/usr/bin/env bash
# Every check aad-med needs from a GPU, as one prepared run (at most about 9 minutes):
# the CUDA and cuDNN versions, the gpu-marked tests, a short aad-train and aad-compare on CUDA,
# the same comparison on the CPU (are the vectors the same?), and scripts/benchmark.py on
# CUDA. Each step has its own time limit and the run goes on when one fails; summary.txt says
# which passed. Figures go to $OUT (the device tool's folder; default outputs/gpu_checks).
#
#   bash scripts/device_deps.sh                      # here, once: stage the missing packages
#   device run: carry=[".devdeps"], command="bash scripts/gpu_checks.sh", timeout_s=590
#
# The sections of scripts/benchmark.py that a GPU changes run (B2 training step variants, B3
# loader, B4 encoding); the CPU-only ones (B1, B5, B6) are measured on the CPU machines.
#
# BENCHMARKS.md's GPU rows take their figures from benchmark.md and cuda_vs_cpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.devdeps:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt, record status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") in $((SECONDS - t0)) s" \
    | tee -a "$summary"
}

step env 30 $PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
assert torch.cuda.is_available(), "no CUDA device visible"
print("device", torch.cuda.get_device_name(0))
v = torch.backends.cudnn.version()
print("cudnn", v)
assert v is not None and v >= 91500, f"cuDNN {v} < 9.15 (91500)"
import monai, nibabel, hydra
print("monai", monai.__version__, "nibabel", nibabel.__version__, "hydra", hydra.__version__)
try:
    import isal
    print("isal", isal.__version__)
except ImportError:
    print("isal missing: zlib decoding")
PY

step pytest_gpu 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests

# A short real run on CUDA: two synthetic sites at the default volume size, the default model.
$PY -m aad_med.cli.synth "$WORK/site_a" --n-subjects 12 --site reference --seed 0 > /dev/null
$PY -m aad_med.cli.synth "$WORK/site_b" --n-subjects 12 --site scanner_b --seed 1 > /dev/null
step train_compare 150 bash -c "
  $PY -m aad_med.cli.train 'data.cohorts=[$WORK/site_a]' trainer=gpu trainer.max_epochs=3 \
      trainer.progress=false hydra.run.dir=$WORK/train &&
  for dev in cuda cpu; do
    $PY -m aad_med.cli.compare checkpoint=$WORK/train/checkpoints/best.pt \
        cohorts.site_a=$WORK/site_a cohorts.site_b=$WORK/site_b device=\$dev embedding.progress=false stats=quick \
        cache=off hydra.run.dir=$WORK/compare_\$dev || exit 1
  done"
step cuda_vs_cpu 30 $PY - "$WORK" "$OUT/cuda_vs_cpu.json" <<'PY'
import json, sys
import numpy as np
work, out = sys.argv[1], sys.argv[2]
runs = {d: json.load(open(f"{work}/compare_{d}/distances.json")) for d in ("cuda", "cpu")}
vec = {d: np.load(f"{work}/compare_{d}/embeddings.npz") for d in ("cuda", "cpu")}
diff = {k: float(np.max(np.abs(vec["cuda"][k] - vec["cpu"][k]))) for k in vec["cpu"].files
        if vec["cpu"][k].dtype.kind == "f"}
pair = {d: runs[d]["pairs"][0] for d in runs}
report = {
    "max_abs_vector_difference": diff,
    "aad": {d: pair[d]["aad"] for d in pair},
    "aad_p": {d: pair[d]["aad_p"] for d in pair},
    "timings": {d: runs[d].get("timings") for d in runs},
}
json.dump(report, open(out, "w"), indent=1)
print(json.dumps(report, indent=1))
rel = abs(pair["cuda"]["aad"] - pair["cpu"]["aad"]) / max(abs(pair["cpu"]["aad"]), 1e-12)
assert rel < 1e-3, f"AAD differs between CUDA and CPU by {rel:.2e} (relative)"
PY

step benchmark 220 $PY scripts/benchmark.py --device cuda --only B2,B3,B4 --out "$WORK/bench" --tmp "$WORK/tmp"
cp "$WORK"/bench/benchmark.md "$WORK"/bench/benchmark.json "$OUT"/ 2>/dev/null
cat "$summary"
