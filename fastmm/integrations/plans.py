"""What ``fastmm.patch`` swaps in a transformers model: one plan per ``config.model_type``.

A composite model is patched part by part: every module belongs to the nearest enclosing ``PreTrainedModel``
(the model itself, its language model, vision tower, VQ model), and the plan of that sub-model's
``config.model_type`` decides. So LLaVA's CLIP tower follows ``clip_vision_model`` and its language model
``llama``, whatever class wraps them. A model type without a plan gets ``GENERIC``: swaps recognized by
structure, each checked on a probe input before it is kept (fastmm.integrations.patch).

Swap kinds (how each is done, and why by hand where it is):

    attention        transformers' own extension point: the "fastmm" function and mask builder registered in
                     AttentionInterface / AttentionMaskInterface, selected with set_attn_implementation
    rms_norm         forward -> fastmm.ops.modality_rms_norm, one modality, the module's own weight
    layer_norm       forward -> fastmm.ops.modality_layer_norm, one modality, its own weight and bias
    head_layer_norm  Chameleon's q/k LayerNorm (statistics over head_dim, one (weight, bias) row per head):
                     modality_layer_norm with the head index as the modality id
    linear           nn.Linear forward -> fastmm.ops.linear (decode-sized rows on fastmm's GEMV kernels;
                     larger M and autograd go to F.linear inside the op)
    vq               the VQ quantizer's forward -> fastmm.nn.VQCodebook sharing its codebook Parameter;
                     (quantized, loss, indices) like Chameleon's and Janus's quantizers
    vq_indices       the same, indices only, like Emu3's video quantizer

RMSNorms go through transformers' own hook when it is live: transformers marks them kernel-aware
(``@use_kernel_forward_from_hub("RMSNorm")``), and with a ``kernels`` release transformers accepts installed
(transformers 5.25: kernels >= 0.19.1, < 0.20) ``kernels.kernelize`` maps them to fastmm's layer
(fastmm.integrations.kernel_layers). Without it the mark is a no-op and they are patched by hand, as are
LayerNorm, nn.Linear and the quantizers, which carry no such mark.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

RMS_NORM = "rms_norm"
LAYER_NORM = "layer_norm"
HEAD_LAYER_NORM = "head_layer_norm"
LINEAR = "linear"
VQ = "vq"
VQ_INDICES = "vq_indices"

JANUS_IMAGE = "janus_image"  # generate(generation_mode="image") on fastmm.runtime.generate_image

# Why a module stays transformers' own (shown in the patch report).
ENCODER_LINEAR = "encoder projection: its rows are the tokens of whole images, never a decode step's few"
GROUP_NORM = "no fastmm op for GroupNorm / BatchNorm / spatial norms (VQ-VAE convolution stacks)"
CONV_ATTENTION = "convolutional attention block: transformers does not route it through AttentionInterface"


def _frozen(mapping: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclasses.dataclass(frozen=True)
class Plan:
    attention: bool  # set the sub-model's attention implementation to "fastmm"
    swaps: Mapping[str, str] = dataclasses.field(default_factory=_frozen)  # module class name -> swap kind
    kept: Mapping[str, str] = dataclasses.field(default_factory=_frozen)  # module class name -> why not swapped
    generate: str | None = None  # a generation loop routed to fastmm.runtime (JANUS_IMAGE)
    generic: bool = False  # no plan for this model type: swap what is recognized by structure


def _plan(attention: bool, swaps=None, kept=None, generate=None) -> Plan:
    return Plan(attention, _frozen(swaps), _frozen(kept), generate)


_VQ_KEPT = {"GroupNorm": GROUP_NORM}

PLANS: Mapping[str, Plan] = MappingProxyType({
    "llama": _plan(True, {"LlamaRMSNorm": RMS_NORM, "Linear": LINEAR}),
    "qwen2": _plan(True, {"Qwen2RMSNorm": RMS_NORM, "Linear": LINEAR}),
    "llava": _plan(True, {"Linear": LINEAR}),  # lm_head and the projector
    "clip_vision_model": _plan(True, {"LayerNorm": LAYER_NORM}, {"Linear": ENCODER_LINEAR}),
    "janus": _plan(True, {"Linear": LINEAR}, generate=JANUS_IMAGE),  # lm_head, aligners, generation head
    "janus_vision_model": _plan(True, {"LayerNorm": LAYER_NORM}, {"Linear": ENCODER_LINEAR}),
    "janus_vqgan": _plan(
        False, {"JanusVQVAEVectorQuantizer": VQ}, {**_VQ_KEPT, "JanusVQVAEAttnBlock": CONV_ATTENTION}
    ),
    "chameleon": _plan(
        True, {"ChameleonRMSNorm": RMS_NORM, "ChameleonLayerNorm": HEAD_LAYER_NORM, "Linear": LINEAR}
    ),
    "chameleon_vqgan": _plan(
        False, {"ChameleonVQVAEVectorQuantizer": VQ}, {**_VQ_KEPT, "ChameleonVQVAEEncoderAttnBlock": CONV_ATTENTION}
    ),
    "emu3": _plan(True, {"Linear": LINEAR}),  # lm_head
    "emu3_text_model": _plan(True, {"Emu3RMSNorm": RMS_NORM, "Linear": LINEAR}),
    "emu3_vqgan": _plan(
        True,  # its attention block goes through AttentionInterface (non-causal, no mask)
        {"Emu3VQVAEVectorQuantizer": VQ_INDICES},
        {**_VQ_KEPT, "Emu3VQVAEGroupNorm": GROUP_NORM, "BatchNorm3d": GROUP_NORM, "Emu3VQVAESpatialNorm": GROUP_NORM,
         "Linear": ENCODER_LINEAR},
    ),
})  # fmt: skip

GENERIC = Plan(attention=True, generic=True)


def plan_for(model_type: str | None) -> Plan:
    """The plan of ``model_type``, or GENERIC when the table has none."""
    return PLANS.get(model_type, GENERIC) if model_type is not None else GENERIC
