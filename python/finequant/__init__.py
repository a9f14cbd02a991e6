"""finequant: INT8/INT4 post-training quantization (ZeroQuant) and an integer inference engine.

The math lives in the C++ extension (finequant._core); this package reads Hugging Face models,
parses schemes, holds the torch reference ops and writes the model file. torch is imported only
by the modules that need it.
"""
from ._core import ModelFileError, cuda_backend_built, cuda_device_count
from ._core import version as _core_version
from .schemes import LinearQuant, QuantScheme, parse_scheme
from .engine import Engine

__version__ = _core_version()

__all__ = ["Engine", "ModelFileError", "LinearQuant", "QuantScheme", "parse_scheme", "cuda_backend_built",
           "cuda_device_count", "__version__"]
