"""Launchers for the C++ CPU kernels in fastmm._C, one module per op family.

Each launcher allocates outputs with torch and passes raw pointers and sizes to the extension, which never
links libtorch. Inputs arrive already validated by fastmm.ops: contiguous, right dtype, ids in range.
"""
