"""Public ops. Each validates its inputs, then runs on the backend chosen for the tensors' device
(fastmm.backend): reference (PyTorch), native (C++, CPU) or triton (CUDA, or CPU under TRITON_INTERPRET=1).
Each is also registered as ``torch.ops.fastmm.<name>`` for torch.compile and autograd."""

from fastmm.ops.attention import decode_attention, key_ranges, span_attention
from fastmm.ops.fusion import resolution_fusion, resolution_slow_branch
from fastmm.ops.linear import linear
from fastmm.ops.norm import modality_layer_norm, modality_rms_norm
from fastmm.ops.prune import attention_importance, compact_key_ranges, compact_tokens, span_keys, top_k_mask
from fastmm.ops.routed_linear import routed_linear
from fastmm.ops.sampling import cfg_sample, jacobi_verify
from fastmm.ops.vq import vq_embed, vq_quantize

__all__ = [
    "modality_rms_norm",
    "modality_layer_norm",
    "routed_linear",
    "vq_quantize",
    "vq_embed",
    "key_ranges",
    "span_attention",
    "decode_attention",
    "linear",
    "cfg_sample",
    "jacobi_verify",
    "resolution_slow_branch",
    "resolution_fusion",
    "attention_importance",
    "compact_tokens",
    "compact_key_ranges",
    "span_keys",
    "top_k_mask",
]
