#!/usr/bin/env bash
# Stage what a lent GPU machine lacks into .devdeps/ (ignored by git, carried by the device
# tool): the GPU image has Python 3.12 with PyTorch, numpy, scipy, matplotlib, tqdm and
# tensorboard, but not aad-med's other dependencies, and it cannot reach a package index.
# monai, nibabel, hydra-core, omegaconf and antlr4 are pure Python and are copied from this
# checkout's .venv (antlr4 4.9.3, which hydra-core 1.3 pins, exists only as an sdist); isal is
# compiled, so its CPython 3.12 wheel is downloaded and unpacked (without it aad_med.data.io
# falls back to zlib). About 35 MB; the device tool carries at most 64 MB per call.
#
#   bash scripts/device_deps.sh          # (VENV_PYTHON=... for another venv) then, in the device call: carry=[".devdeps"],
#                                        # command="bash scripts/gpu_checks.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
site=$("${VENV_PYTHON:-.venv/bin/python}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .devdeps && mkdir -p .devdeps
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.devdeps/' "$exclude" 2>/dev/null || echo '/.devdeps/' >> "$exclude"
for pkg in monai nibabel hydra omegaconf antlr4; do
  cp -r "$site/$pkg" .devdeps/
done
find .devdeps -name '__pycache__' -prune -exec rm -rf {} +
wheels=$(mktemp -d)
if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels" "isal>=1.6"; then
  python3 -m zipfile -e "$wheels"/isal-*.whl .devdeps/
else
  echo "isal wheel not downloaded: the GPU run will decode .nii.gz with zlib" >&2
fi
rm -rf "$wheels"
du -sh .devdeps
