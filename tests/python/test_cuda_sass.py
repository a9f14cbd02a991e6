"""The CUDA backend's CUTLASS kernels really use the integer tensor cores (docs/DESIGN.md section 5).

Needs no GPU: cuobjdump disassembles finequant._core's embedded cubins. A wrong build can compile
a kernel into a stub (sm_90 instead of sm_90a) or emulate INT4 MMA; here the sm_80 SASS must hold
IMMA in the W8A8, W4A8 and W4A4 kernels (INT4 IMMA in W4A4), and the sm_90a SASS IGMMA in the
Hopper kernels. cuobjdump and nvdisasm come from PyPI (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm,
requirements-dev.txt), else from PATH.
"""
import functools
import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import finequant._core as core

pytestmark = pytest.mark.skipif(not core.cuda_backend_built(), reason="finequant was built without the CUDA backend")

# Template arguments in the Itanium-mangled kernel names (builtins such as `a`, int8_t, are never
# abbreviated by substitutions, so any other B type here is the int4 one).
_INT8 = "a"
_INT4 = "NS_15integer_subbyteILi4ELb1EEE"
_SM80_GEMM = re.compile(
    rf"DefaultGemmWithVisitorI(?P<a>{_INT8}|{_INT4})NS_6layout8RowMajorE"
    rf"LNS_16ComplexTransformE0ELi\d+E(?P<b>{_INT8}|{_INT4}|S\w*?_)")


def find_tools(tmp_dir=None):
    """(cuobjdump, directory holding nvdisasm) from the PyPI wheels or PATH; (None, None) if absent.

    Wheel binaries may lack the executable bit: set it, or run copies from tmp_dir when the
    package directory is read-only."""
    dirs = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            dirs += sorted(Path(root).glob("cu*/bin"))
    for d in dirs:
        cuobjdump, nvdisasm = d / "cuobjdump", d / "nvdisasm"
        if not (cuobjdump.is_file() and nvdisasm.is_file()):
            continue
        if _make_executable(cuobjdump) and _make_executable(nvdisasm):
            return str(cuobjdump), str(d)
        if tmp_dir is not None:
            copy = Path(tmp_dir) / "cuda-bin"
            copy.mkdir(exist_ok=True)
            for tool in (cuobjdump, nvdisasm):
                shutil.copy(tool, copy / tool.name)
                _make_executable(copy / tool.name)
            return str(copy / "cuobjdump"), str(copy)
    cuobjdump, nvdisasm = shutil.which("cuobjdump"), shutil.which("nvdisasm")
    if cuobjdump and nvdisasm:
        return cuobjdump, str(Path(nvdisasm).parent)
    return None, None


def _make_executable(path):
    if os.access(path, os.X_OK):
        return True
    try:
        os.chmod(path, path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError:
        return False
    return os.access(path, os.X_OK)


def sass_functions(binary, arch, cuobjdump, nvdisasm_dir):
    """{mangled kernel name: its SASS} for the cubins of exactly `arch` (e.g. "sm_80", "sm_90a") in
    any binary cuobjdump reads (object file, shared library, executable); {} when there are none.
    (cuobjdump's own -arch filter is loose: -arch sm_90a also lists sm_90 cubins.)"""
    functions, current, name, body = {}, None, None, []

    def close():
        if name is not None and current == arch:
            functions[name] = "\n".join(body)

    for line in _disassembly(str(binary), cuobjdump, nvdisasm_dir).splitlines():
        header = re.match(r"\s*arch = (\w+)\s*$", line)
        function = re.search(r"Function : (\S+)", line)
        if header or function:
            close()
            name, body = None, []
            if header:
                current = header.group(1)
            else:
                name = function.group(1)
        elif name is not None:
            body.append(line)
    close()
    return functions


@functools.lru_cache(maxsize=4)
def _disassembly(binary, cuobjdump, nvdisasm_dir):
    """cuobjdump -sass of every cubin in `binary` (one run: the library's SASS is large)."""
    env = dict(os.environ)
    env["PATH"] = nvdisasm_dir + os.pathsep + env.get("PATH", "")
    run = subprocess.run([cuobjdump, "-sass", binary], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {binary}: {run.stderr.strip()}")
    return run.stdout


def sm80_int_gemms(functions):
    """{"W8A8" | "W4A8" | "W4A4": [SASS of each such CUTLASS 2.x kernel of ours]}."""
    kinds = {"W8A8": [], "W4A8": [], "W4A4": []}
    for name, sass in functions.items():
        found = _SM80_GEMM.search(name)
        if not found or "finequant" not in name:
            continue
        a_int8, b_int8 = found.group("a") == _INT8, found.group("b") == _INT8
        kind = "W8A8" if a_int8 and b_int8 else "W4A8" if a_int8 else "W4A4"
        kinds[kind].append(sass)
    return kinds


def sm90_int_gemms(functions):
    """SASS of each CUTLASS 3.x Hopper (TMA warp-specialized) kernel of ours."""
    return [sass for name, sass in functions.items() if "MainloopSm90Tma" in name and "finequant" in name]


def check_binary(binary, cuobjdump, nvdisasm_dir):
    sm80 = sm80_int_gemms(sass_functions(binary, "sm_80", cuobjdump, nvdisasm_dir))
    for kind, kernels in sm80.items():
        assert kernels, f"no {kind} CUTLASS kernel in the sm_80 SASS of {binary}"
    for sass in sm80["W8A8"] + sm80["W4A8"]:  # W4A8: int4 weights widened, int8 MMA
        assert re.search(r"\bIMMA\.\w*\.S8\.S8", sass), "an int8 sm_80 kernel has no IMMA ...S8.S8"
    for sass in sm80["W4A4"]:
        assert re.search(r"\bIMMA\.\w*\.S4\.S4", sass), "a W4A4 sm_80 kernel has no INT4 IMMA ...S4.S4"
    sm90 = sm90_int_gemms(sass_functions(binary, "sm_90a", cuobjdump, nvdisasm_dir))
    assert sm90, f"no sm_90a CUTLASS kernel in {binary}"
    for sass in sm90:
        assert re.search(r"\bIGMMA\.\w+\.S8\.S8", sass), "an sm_90a kernel has no IGMMA ...S8.S8 (a stub?)"
    # The hand-written K-blocked kernel (any bits): mma.sync s8 on sm_80 and on Hopper.
    for arch in ("sm_80", "sm_90"):
        blocked = [sass for name, sass in sass_functions(binary, arch, cuobjdump, nvdisasm_dir).items()
                   if "blocked" in name and "finequant" in name]
        assert blocked, f"no gemm_int_blocked kernel in the {arch} SASS of {binary}"
        for sass in blocked:
            assert re.search(r"\bIMMA\.16832\.S8\.S8", sass), f"a blocked {arch} kernel has no IMMA.16832.S8.S8"


def test_integer_gemms_use_tensor_cores(tmp_path):
    cuobjdump, nvdisasm_dir = find_tools(tmp_path)
    # A built CUDA backend must be checked: missing tools fail, they do not skip.
    assert cuobjdump is not None, "cuobjdump/nvdisasm not found: pip install -r requirements-dev.txt"
    check_binary(Path(core.__file__), cuobjdump, nvdisasm_dir)
