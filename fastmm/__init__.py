"""fastmm: a kernel-optimized runtime for unified multimodal models.

    import fastmm
    y = fastmm.ops.modality_rms_norm(x, modality, weight)       # one op, backend chosen by device
    with fastmm.use_backend("reference"):                         # or FASTMM_BACKEND=reference
        y_ref = fastmm.ops.modality_rms_norm(x, modality, weight)
"""

import sys

from fastmm import _native_library

_native_library.load_from_env(sys.modules[__name__])  # before any module imports fastmm._C

from fastmm import integrations, nn, ops, runtime  # noqa: E402
from fastmm.backend import use_backend  # noqa: E402
from fastmm.integrations import patch, unpatch  # noqa: E402
from fastmm.profiling import profile  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ops", "nn", "runtime", "integrations", "use_backend", "patch", "unpatch", "profile", "__version__"]
