"""fastmm: a kernel-optimized runtime for unified multimodal models.

    import fastmm
    y = fastmm.ops.modality_rms_norm(x, modality, weight)       # one op, backend chosen by device
    with fastmm.use_backend("reference"):                         # or FASTMM_BACKEND=reference
        y_ref = fastmm.ops.modality_rms_norm(x, modality, weight)
"""

from fastmm import integrations, nn, ops, runtime
from fastmm.backend import use_backend
from fastmm.integrations import patch, unpatch
from fastmm.profiling import profile

__version__ = "0.1.0"

__all__ = ["ops", "nn", "runtime", "integrations", "use_backend", "patch", "unpatch", "profile", "__version__"]
