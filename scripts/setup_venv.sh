#!/usr/bin/env bash
# Copyright MedAttnSlicer contributors. Apache-2.0.
# Create or update the project's virtual environment in .venv (idempotent, fast when nothing changed).
# Every pip call goes through requirements/constraints.txt so that the local CPU torch wheel is used
# and no CUDA build of torch (with its nvidia-* packages) is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.medattn-requirements.sha256
want=$(cat requirements/*.txt scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_install() { .venv/bin/pip install --disable-pip-version-check -q -c requirements/constraints.txt "$@" 2>&1 \
  | grep -v -e "is ignored: it is neither a file nor a directory" -e "dependency resolver does not currently" \
            -e "requires sam2" -e "requires torchvision" || true; }
pip_install -r requirements/runtime.txt -r requirements/dev.txt
# monailabel without its declared requirements: sam2 (an sdist whose build pulls CUDA torch) and torchvision
# (no CPU build for this torch) cannot be installed here; the app never imports the parts that need them.
pip_install --no-deps monailabel==0.8.5
.venv/bin/python - <<'PY'
import torch, sys
if torch.__version__ != "2.13.0+cpu":
    sys.exit(f"setup_venv: expected torch 2.13.0+cpu, found {torch.__version__}")
PY
echo "$want" > "$stamp"
