"""What every native launcher shares with csrc/common.h."""

import torch

# fastmm::DType codes (csrc/common.h).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
