"""transformers Janus's ``generate(generation_mode="image")`` on fastmm's runtime.

``fastmm.patch`` gives a JanusForConditionalGeneration a ``generate`` that runs image generation with
``fastmm.runtime.generate_image`` on a ``UnifiedModel`` built in memory from the model's own weights
(``UnifiedModel.from_janus_state_dict``: the tensors are shared; the fused q/k/v and gate/up projections and the
generation table are computed once and rebuilt only when a weight of the transformers model changes). The
transformers parameters are never modified.

The recipes are the same: conditional rows and unconditional rows (the prompt with every token but BOS and BOI
replaced by the pad token), guidance ``u + s (c - u)`` with transformers' default s = 5, then temperature,
top-k and top-p in transformers' order, greedy without ``do_sample``. The random draws are not transformers':
fastmm samples with its counter-based RNG (seeded from torch's default generator, so ``torch.manual_seed``
still makes a run reproducible), where transformers calls ``torch.multinomial``.

Anything the fastmm runtime does not do falls back to transformers' own generate, with the reason logged once:
a custom ``logits_processor``, a generation-config entry that adds another logits processor (repetition
penalty, min-p, ...), ``return_dict_in_generate`` / ``output_*``, padded prompts (zeros in
``attention_mask``), model inputs other than the prompt ids (``inputs_embeds``, a cache, ...), a guidance
scale <= 1, beam search, special tokens that differ from the model's generation config, or a model
configuration ``UnifiedModel`` cannot hold. Text generation (the default mode) is transformers' own.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from fastmm.models import UnifiedModel, convert
from fastmm.runtime import generate_image

logger = logging.getLogger("fastmm")

DEFAULT_GUIDANCE = 5.0  # transformers Janus's value when guidance_scale is None
# The logits processors transformers would build that the fastmm sampler applies itself, in the same order.
_SAMPLER_PROCESSORS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")
_reported: set[str] = set()


class Fallback(Exception):
    """The call needs something the fastmm runtime does not do; the message says what."""


def _fall_back(reason: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        logger.warning("fastmm: Janus image generation runs transformers' own generate: %s", reason)


def build_unified_model(hf) -> UnifiedModel:
    """A fastmm UnifiedModel over the weights of transformers' JanusForConditionalGeneration ``hf``."""
    config_dict = hf.config.to_dict()
    vision = dict(config_dict.get("vision_config") or {})
    # transformers reads the image token count at every generate call; so does the route (see JanusImageRoute)
    vision["num_image_tokens"] = (vision.get("image_size", 384) // vision.get("patch_size", 16)) ** 2
    config_dict["vision_config"] = vision
    generation = hf.generation_config
    special = {"bos_token_id": generation.bos_token_id, "eos_token_id": generation.eos_token_id,
               "pad_token_id": generation.pad_token_id, "generation_kwargs": generation.generation_kwargs or {}}  # fmt: skip
    config = convert.config_from_janus(config_dict, special)
    weight = hf.get_input_embeddings().weight
    return UnifiedModel.from_janus_state_dict(
        config, hf.state_dict(), weight.dtype, weight.device, source="the transformers model's state dict"
    )


class JanusImageRoute:
    """The fastmm side of one patched Janus model: its UnifiedModel, built on first use."""

    def __init__(self):
        self._model: UnifiedModel | None = None
        self._weights_key: tuple | None = None

    def unified_model(self, hf) -> UnifiedModel:
        """The UnifiedModel over ``hf``'s weights; rebuilt when a parameter was replaced, moved, cast or updated in
        place (its version counter moved)."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in hf.parameters())
        if self._model is None or key != self._weights_key:
            try:
                self._model = build_unified_model(hf)
            except ValueError as error:  # a configuration UnifiedModel does not hold
                raise Fallback(str(error)) from error
            self._weights_key = key
        return self._model

    def generate(self, hf, original: Callable, inputs, attention_mask, logits_processor, kwargs: dict[str, Any]):
        """transformers' ``generate(inputs, attention_mask, logits_processor, **kwargs)`` of ``hf``: image mode on
        fastmm, anything else (or what fastmm cannot do) through ``original``."""
        if kwargs.get("generation_mode", "text") != "image":
            return original(inputs=inputs, attention_mask=attention_mask, logits_processor=logits_processor, **kwargs)
        try:
            return self._generate_image(hf, inputs, attention_mask, logits_processor, dict(kwargs))
        except Fallback as reason:
            _fall_back(str(reason))
        return original(inputs=inputs, attention_mask=attention_mask, logits_processor=logits_processor, **kwargs)

    def _generate_image(self, hf, inputs, attention_mask, logits_processor, kwargs: dict[str, Any]) -> torch.Tensor:
        from transformers import LogitsProcessorList
        from transformers.generation.configuration_utils import GenerationMode

        kwargs.pop("generation_mode")
        if logits_processor:
            raise Fallback(f"a custom logits_processor ({[type(p).__name__ for p in logits_processor]})")
        config, model_kwargs = hf._prepare_generation_config(kwargs.pop("generation_config", None), **kwargs)
        mode = config.get_generation_mode()
        if mode not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH):
            raise Fallback(f"generation mode {mode} (fastmm decodes greedily or samples, num_beams=1)")
        config.validate()  # as transformers does: an invalid combination raises its own error
        if config.return_dict_in_generate:
            raise Fallback("return_dict_in_generate=True (fastmm returns the image tokens only)")
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        model_kwargs.pop("use_cache", None)
        if model_kwargs:
            raise Fallback(f"arguments fastmm's image generation does not take: {sorted(model_kwargs)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise Fallback(f"inputs must be prompt ids [B, L], got {getattr(input_ids, 'shape', type(input_ids))}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise Fallback("a padded batch (attention_mask holds zeros)")
        scale = DEFAULT_GUIDANCE if config.guidance_scale is None else float(config.guidance_scale)
        if scale <= 1:
            raise Fallback(f"guidance_scale={scale} (transformers' Janus recipe needs guidance > 1)")
        boi = (config.generation_kwargs or {}).get("boi_token_id")

        config.guidance_scale = None  # as transformers does before building the processors: CFG is applied apart
        hf._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device)
        processors = hf._get_logits_processor(
            generation_config=config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device=input_ids.device,
        )  # fmt: skip
        names = [type(p).__name__ for p in processors]
        unsupported = [name for name in names if name not in _SAMPLER_PROCESSORS]
        if unsupported:
            raise Fallback(f"the generation config asks for logits processors fastmm does not apply: {unsupported}")

        model = self.unified_model(hf)
        special = model.config
        given = (config.bos_token_id, config.pad_token_id, boi)
        if given != (special.bos_token_id, special.pad_token_id, special.boi_token_id):
            raise Fallback(
                f"special tokens (bos, pad, boi) {given} differ from the model's generation config "
                f"{(special.bos_token_id, special.pad_token_id, special.boi_token_id)}"
            )
        if input_ids.device != model.decoder.embed_tokens.weight.device:
            raise Fallback(f"inputs are on {input_ids.device}, the model on {model.decoder.embed_tokens.weight.device}")
        special.image_gen.num_image_tokens = hf.model.vision_model.config.num_image_tokens
        sampling = {"temperature": 0.0, "top_k": None, "top_p": None}
        if config.do_sample:
            sampling = {
                "temperature": float(config.temperature) if "TemperatureLogitsWarper" in names else 1.0,
                "top_k": int(config.top_k) if "TopKLogitsWarper" in names else None,
                "top_p": float(config.top_p) if "TopPLogitsWarper" in names else None,
            }
        images = config.num_return_sequences or 1
        tokens = [
            generate_image(model, row, cfg_scale=scale, num_images=images, decode_pixels=False, **sampling).tokens
            for row in input_ids
        ]
        return torch.cat(tokens).to(input_ids.dtype)
