"""Plain-PyTorch implementations, one module per op family: fp32 math, one cast at the end.

They are the specification of every op and the oracle of every test. They import only torch.
"""
