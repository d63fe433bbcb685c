"""Triton backend of the `attention` family: span attention (prefill, forward and backward: span_attention.py) and
flash-decoding over a static cache (decode_attention.py), with the building blocks both use in
_attention_blocks.py (logits, masks, softcap, the online-softmax loop, launch and AOT helpers).

Every mask is one key range per query, ``kv_start[b, i] <= j < kv_end[b, i]`` (causal text, bidirectional
image spans, packed documents, sliding windows), so a kernel reads O(L) metadata instead of an L x L mask.
On top of the ranges a launch may take key padding (key_keep [B, S] bool), any [B, Lq, S] mask (bool: False
drops the pair; float32: added to the logits) and a logit softcap; each is a constexpr flag, so a launch
without them compiles to the plain range kernel. Semantics: ``fastmm.reference.attention`` (its
kernel-interface section).

Inputs arrive validated and contiguous from ``fastmm.ops.attention``: q [B, Hq, Lq, d], k / v [B, Hkv, S, d]
with Lq <= S and Hq a multiple of Hkv (query head h reads kv head h // (Hq / Hkv)), fp32 / fp16 / bf16, int32
key ranges [B, Lq] indexing the S keys and cache lengths on the device. Nothing here syncs the host: every
launch is CUDA-graph capturable.

Head dims are padded to BLOCK_D = 64 or 128 with masking (every d in [1, 128] runs one of two compiled
variants); wider heads have no compiled configuration and run ``fastmm.reference.attention`` instead,
with one logged warning per op. Launches with key padding, a mask or a softcap run smaller tiles (see
span_attention._FWD_LAUNCH_MASKED); the fp32 backward among them has none that compiles spill-free at BLOCK_D = 128 and
runs the reference there, with one logged warning.
"""

from fastmm.triton._attention_blocks import MAX_HEAD_DIM
from fastmm.triton.decode_attention import decode_attention_fwd
from fastmm.triton.span_attention import span_attention_bwd, span_attention_fwd

__all__ = ["MAX_HEAD_DIM", "decode_attention_fwd", "span_attention_bwd", "span_attention_fwd"]
