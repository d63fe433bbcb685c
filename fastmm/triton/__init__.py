"""Triton (GPU) kernels, one module per op family, each with its launchers and AOT registrations.

Modules here import triton at import time; fastmm.ops imports them only when the triton backend is chosen.
"""
