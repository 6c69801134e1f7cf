#!/usr/bin/env bash
# Every check aad-med needs from a GPU, as one prepared run (7-8 minutes on an H200):
# the CUDA and cuDNN versions, the gpu-marked tests, a short aad-train and aad-compare on CUDA,
# the same comparison on the CPU (are the vectors the same?), and scripts/benchmark.py on
# CUDA. Each step has its own time limit and the run goes on when one fails; summary.txt says
# which passed. Results go to $OUT (the device tool's folder; default outputs/gpu_checks), in
# at most 8 files because the device tool returns no more: summary.txt, log.txt (every step's
# output, appended as each step ends, so a run cut short still returns what it did),
# cuda_vs_cpu.json, encode_brats.json and the benchmark's json/md for B3+B4 and for B2.
#
#   bash scripts/device_deps.sh                      # here, once: stage the missing packages
#   device run: carry=[".devdeps"], command="bash scripts/gpu_checks.sh", timeout_s=600
#
# The sections of scripts/benchmark.py that a GPU changes run (B2 training step variants, B3
# loader, B4 encoding at 240x240x155); the CPU-only ones (B1, B5, B6) are measured on the CPU
# machines. B2 runs last and alone: its torch.compile variants are the slowest to start, and a
# benchmark writes its files only at its end.
#
# BENCHMARKS.md's GPU rows take their figures from these files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.devdeps:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
summary="$OUT/summary.txt"
: > "$summary"
: > "$OUT/log.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, append its output to log.txt
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.txt" 2>&1
  local rc=$?
  { echo "===== $name (exit $rc, $((SECONDS - t0)) s)"; tail -c 20000 "$WORK/$name.txt"; } \
    >> "$OUT/log.txt"
  echo "$name: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") in $((SECONDS - t0)) s" \
    | tee -a "$summary"
}

step env 60 $PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
assert torch.cuda.is_available(), "no CUDA device visible"
print("device", torch.cuda.get_device_name(0))
v = torch.backends.cudnn.version()
print("cudnn", v)
assert v is not None and v >= 91500, f"cuDNN {v} < 9.15 (91500)"
import monai, nibabel, hydra, numpy, scipy
print("monai", monai.__version__, "nibabel", nibabel.__version__, "hydra", hydra.__version__,
      "numpy", numpy.__version__, "scipy", scipy.__version__)
try:
    import isal
    print("isal", isal.__version__)
except ImportError:
    print("isal missing: zlib decoding")
import aad_med.cli.compare, aad_med.cli.train  # every import the checks below need
PY

step pytest_gpu 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests

# A short real run on CUDA: two synthetic sites at the default volume size, the default model.
step synth 60 bash -c "
  $PY -m aad_med.cli.synth $WORK/site_a --n-subjects 12 --site reference --seed 0 &&
  $PY -m aad_med.cli.synth $WORK/site_b --n-subjects 12 --site scanner_b --seed 1"
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

# Encoding at BraTS size with the default encoder on CUDA: a first comparison filling the
# preprocessed cache and a second one with another checkpoint (issue 17's second-run ratio and
# the forward pass's share), plus the cache-off runs; the data path on one CPU thread.
step encode_brats 240 bash -c "
  $PY scripts/encode_at_brats_size.py --out $WORK/eb --only default --default-subjects 4 \
      --device cuda && cp $WORK/eb/encode_brats.json $OUT/encode_brats.json"

bench() {  # NAME SECTIONS [ARGS] -> a command line: one benchmark run, json/md copied to $OUT
  echo "$PY scripts/benchmark.py --device cuda --only $2 ${3:-} --out $WORK/$1 --tmp $WORK &&
    cp $WORK/$1/benchmark.json $OUT/$1.json && cp $WORK/$1/benchmark.md $OUT/$1.md"
}
# B4 on 16 subjects (hard links of one) and again with 8 loader workers: what the 16 cores of a
# GPU machine do for a large cohort's data path.
step bench_b3_b4 150 bash -c "$(bench bench_b3_b4 B3,B4 '--b4-subjects 16 --b4-workers 8')"
step bench_b2 120 bash -c "$(bench bench_b2 B2)"
cat "$summary"
