"""The C++ embedding story: install libfinequant with CMake, build examples/cpp against it with
find_package(finequant), and run the program on a model file written by the Python CLI."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "pytest-cpp-package"  # reused between runs: the library build is the slow part


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def example_binary():
    if shutil.which("cmake") is None:
        pytest.fail("cmake is required to build the C++ package")
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    run(["cmake", "-S", REPO, "-B", BUILD / "lib", "-DFINEQUANT_CUDA=OFF", f"-DCMAKE_INSTALL_PREFIX={BUILD / 'prefix'}"])
    run(["cmake", "--build", BUILD / "lib", "-j", jobs])
    run(["cmake", "--install", BUILD / "lib"])
    run(["cmake", "-S", REPO / "examples" / "cpp", "-B", BUILD / "example", f"-DCMAKE_PREFIX_PATH={BUILD / 'prefix'}"])
    run(["cmake", "--build", BUILD / "example", "-j", jobs])
    return BUILD / "example" / "model_info"


@pytest.fixture(scope="module")
def generate_binary(example_binary):
    return example_binary.parent / "generate"  # built with model_info


def test_example_reads_a_quantized_file(example_binary, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    run([sys.executable, "-m", "finequant", "quantize", tmp_path / "hf", "-o", tmp_path / "q", "--scheme", "w4/8a8"])

    out = run([example_binary, tmp_path / "q" / "model.safetensors"]).stdout
    assert "architecture: llama" in out
    assert "quantized linears: 15 of 15" in out  # 2 layers x (q, k, v, o, gate, up, down), and the LM head

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((tmp_path / "q" / "model.safetensors").read_bytes()[:-10])
    proc = subprocess.run([example_binary, corrupt], capture_output=True, text=True)
    assert proc.returncode == 1 and "error:" in proc.stderr


def test_generate_example_matches_python_engine(generate_binary, tiny_models, tmp_path):
    import finequant

    q = tmp_path / "q"
    run([sys.executable, "-m", "finequant", "quantize", tiny_models["llama"], "-o", q, "--scheme", "w8a8", "--quiet"])
    prompt = [3, 17, 42, 5, 9, 28]

    out = run([generate_binary, q, "--new", "5", *prompt]).stdout.split()
    expected = finequant.Engine(str(q)).generate(prompt, max_new_tokens=5, stop_tokens=[])
    assert [int(t) for t in out] == expected and len(expected) == 5

    # forward mode: one argmax line per position, the last one the first generated token
    lines = run([generate_binary, q, *prompt]).stdout.splitlines()
    assert lines[0].startswith("llama (w8a8") and "[1, 6, 64]" in lines[0]
    assert len(lines) == 1 + len(prompt) and f"argmax {expected[0]} " in lines[-1]

    for args in ([q, "3", "64"], [q, "--new", "2", "3", "-1"]):  # vocab is 64
        proc = subprocess.run([str(a) for a in [generate_binary, *args]], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith("error:"), proc.stderr
    proc = subprocess.run([str(generate_binary), tmp_path / "missing", "1"], capture_output=True, text=True)
    assert proc.returncode == 1 and "error:" in proc.stderr
