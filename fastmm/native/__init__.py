"""Launchers for the C++ CPU kernels in fastmm._C, one module per op family.

Each launcher allocates outputs with torch and passes tensors to the extension, which never links libtorch: it
reads each tensor's pointer, sizes and strides itself and checks them (dtype, shape, layout, storage bounds)
before a kernel runs (csrc/tensor_arg.h). The fused decode step is the exception: its runner checks its buffers
once and passes raw pointers on every step (decode_layer.py). Inputs arrive already validated by fastmm.ops.
"""
