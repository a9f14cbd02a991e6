"""Choosing where the engine runs: "cpu", "cuda", "cuda:N", "auto". Without a GPU (or without the CUDA
backend in the build) asking for CUDA fails with an error that says what is missing; "auto" runs on the
CPU; a misspelt device is a ValueError. The same choice reaches the CLI (--device) and one Linear."""
import subprocess
import sys

import numpy as np
import pytest

from finequant import Engine, _core

HAVE_GPU = _core.cuda_backend_built() and _core.cuda_device_count() > 0


@pytest.fixture(scope="module")
def gpt2_dir(tiny_models):
    return str(tiny_models["gpt2"])


def test_cpu_and_auto(gpt2_dir):
    cpu = Engine(gpt2_dir, device="cpu")
    assert cpu.device == "cpu" and cpu.backend.startswith("cpu (")
    auto = Engine(gpt2_dir, device="auto")
    assert auto.device == ("cuda:0" if HAVE_GPU else "cpu")
    ids = np.arange(10, dtype=np.int64).reshape(2, 5)
    if not HAVE_GPU:
        assert np.array_equal(auto.forward(ids), cpu.forward(ids))


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_fails_clearly(gpt2_dir, device):
    if _core.cuda_backend_built():
        with pytest.raises(RuntimeError, match=rf"device '{device}': no CUDA device is available"):
            Engine(gpt2_dir, device=device)
    else:
        with pytest.raises(NotImplementedError, match="no CUDA backend"):
            Engine(gpt2_dir, device=device)
    with pytest.raises((RuntimeError, NotImplementedError), match="CUDA"):
        _core.Linear(np.ones((4, 8), np.float32), device=device)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", ""])
def test_misspelt_devices(gpt2_dir, device):
    with pytest.raises(ValueError, match="device"):
        Engine(gpt2_dir, device=device)


def test_cli_device_option(gpt2_dir):
    ok = subprocess.run([sys.executable, "-m", "finequant", "run", gpt2_dir, "--prompt", "x", "--device", "cpu",
                         "--max-tokens", "2"], capture_output=True, text=True)
    # The tiny model has no tokenizer: the run stops there, after the engine loaded on the device.
    assert "device" not in ok.stderr
    if not HAVE_GPU:
        bad = subprocess.run([sys.executable, "-m", "finequant", "run", gpt2_dir, "--prompt", "x", "--device", "cuda"],
                             capture_output=True, text=True)
        assert bad.returncode != 0 and "CUDA" in bad.stderr and "Traceback" not in bad.stderr

