#!/usr/bin/env bash
# The README's main command: build/refresh the CPU environment, then generate with the built-in
# SmolLM2-135M and kv_cache_dtype=turboquant_3.5. Arguments go to `python -m vllm_turboquant.demo`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
VENV=${TQ_VENV:-$ROOT/.venv}
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0} HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m vllm_turboquant.demo "$@"
