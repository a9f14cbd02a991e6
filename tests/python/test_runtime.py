"""The build reports what it has; without a GPU the CUDA backend answers 'no device', never crashes."""
import glob
import os
import shutil

import finequant


def test_cuda_device_count_without_gpu():
    count = finequant.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if not glob.glob("/dev/nvidia[0-9]*"):
        assert count == 0


def test_cuda_backend_built_when_nvcc_and_cutlass_exist():
    # make test builds with FINEQUANT_CUDA=AUTO and installs the CUTLASS headers, so a machine with
    # nvcc must have produced the CUDA backend; one without nvcc must have skipped it.
    import importlib.util

    expected = (os.environ.get("FINEQUANT_CUDA", "AUTO") != "OFF" and shutil.which("nvcc") is not None
                and importlib.util.find_spec("cutlass_library") is not None)
    assert finequant.cuda_backend_built() == expected
