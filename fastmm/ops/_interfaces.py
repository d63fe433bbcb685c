"""The kernel interface of each op family: the functions every backend module (fastmm.reference.<family>,
fastmm.native.<family>, fastmm.triton.<family>) exposes to fastmm.ops, over flattened, contiguous tensors.

One Protocol per family, written once; tests/test_kernel_interfaces.py checks every backend module against it
(the same function names, the same parameters in the same order) and checks that fastmm.ops calls nothing on a
kernel module that the Protocol does not declare. The semantics are the reference's (each reference module's
kernel-interface section); the shapes and dtypes are in the docstrings there.
"""

from __future__ import annotations

from typing import Protocol

import torch

Tensor = torch.Tensor


class AttentionKernels(Protocol):
    def span_attention_fwd(self, q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float,
                           key_keep: Tensor | None, mask: Tensor | None, softcap: float) -> tuple[Tensor, Tensor]: ...  # fmt: skip

    def span_attention_bwd(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, kv_start: Tensor,
                           kv_end: Tensor, scale: float, key_keep: Tensor | None, mask: Tensor | None, softcap: float,
                           dlse: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...  # fmt: skip

    def decode_attention_fwd(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, scale: float,
                             mask: Tensor | None, softcap: float) -> tuple[Tensor, Tensor]: ...  # fmt: skip


class NormKernels(Protocol):
    def rms_norm_fwd(self, x: Tensor, modality: Tensor, weight: Tensor, residual: Tensor | None,
                     eps: float) -> tuple[Tensor, Tensor | None, Tensor]: ...  # fmt: skip

    def rms_norm_bwd(self, dy: Tensor, dresidual_out: Tensor | None, x_in: Tensor, modality: Tensor, weight: Tensor,
                     rstd: Tensor) -> tuple[Tensor, Tensor]: ...  # fmt: skip

    def layer_norm_fwd(self, x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None,
                       residual: Tensor | None, eps: float) -> tuple[Tensor, Tensor | None, Tensor, Tensor]: ...  # fmt: skip

    def layer_norm_bwd(self, dy: Tensor, dresidual_out: Tensor | None, x_in: Tensor, modality: Tensor,
                       weight: Tensor, mean: Tensor, rstd: Tensor,
                       has_bias: bool) -> tuple[Tensor, Tensor, Tensor | None]: ...  # fmt: skip


class RoutedLinearKernels(Protocol):
    def routed_linear_fwd(self, x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def routed_linear_bwd(self, dy: Tensor, x: Tensor, modality: Tensor, weight: Tensor, bias_present: bool,
                          need_dx: bool, need_dweight: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]: ...  # fmt: skip


class VQKernels(Protocol):
    def nearest_code(self, z: Tensor, codebook: Tensor, codebook_sq: Tensor) -> Tensor: ...


class LinearKernels(Protocol):
    def linear_fwd(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...


class SamplingKernels(Protocol):
    def cfg_sample_fwd(self, logits: Tensor, scales: tuple[float, ...], temperature: float, top_k: int, top_p: float,
                   lo: int, hi: int, log_softmax: bool, seed: int, offset: Tensor | None,
                   out: Tensor | None) -> Tensor: ...  # fmt: skip


# family -> (its Protocol, the functions a backend may leave out: ops then runs the reference's).
INTERFACES: dict[str, tuple[type, frozenset[str]]] = {
    "attention": (AttentionKernels, frozenset({"span_attention_bwd"})),  # native trains through the reference
    "norm": (NormKernels, frozenset()),
    "routed_linear": (RoutedLinearKernels, frozenset()),
    "vq": (VQKernels, frozenset()),
    "linear": (LinearKernels, frozenset()),
    "sampling": (SamplingKernels, frozenset()),
}
