"""``fastmm.patch(model)`` / ``fastmm.unpatch(model)``: fastmm's ops inside an already loaded transformers model.

What is swapped follows one table, ``fastmm.integrations.plans.PLANS`` (model type -> plan); this module holds the
mechanics. Every module belongs to the nearest enclosing ``PreTrainedModel`` (the model, its language model,
vision tower, VQ model) and follows the plan of that sub-model's ``config.model_type``:

- attention: transformers' extension point. ``register_with_transformers()`` registers fastmm's attention and
  mask functions under "fastmm", then one ``set_attn_implementation`` call names it for every sub-config whose
  plan says so; the previous names are kept and set back by ``unpatch``.
- norms transformers marks kernel-aware (its RMSNorms): the ``kernels`` package's extension point, when a release
  transformers accepts is installed: ``kernels.kernelize`` with a mapping to fastmm's layer
  (fastmm.integrations.kernel_layers). Without ``kernels`` they are swapped by hand like the rest.
- norms, linears, VQ quantizers: the module's ``forward`` is replaced on the instance by a method that calls
  fastmm's op on the module's own Parameters (no copy, no new Parameter; the weights keep their values).
  Each swap is recorded on the module (``_fastmm``), its ``extra_repr`` names the op, so ``print(model)`` shows
  ``LlamaRMSNorm((64,), eps=1e-06, fastmm=ops.modality_rms_norm)``. A call the op does not cover (another dtype
  than the weight's, autocast) runs the original forward.
- generation: JanusForConditionalGeneration's ``generate(generation_mode="image")`` (fastmm.integrations.janus).

Norm swaps are checked before they are kept: the original forward and fastmm's run on a small probe input
(fixed seed, its own generator) and must agree within the dtype's rounding; this is how a model type without a
plan is patched safely (a Gemma-style RMSNorm scaling by 1 + weight is recognized by name and structure, then
refused by the probe). Nothing raises for a model fastmm does not know: what is not swapped is listed in the
returned PatchReport with its reason, and logged.

``unpatch`` restores the exact forward, extra_repr and generate attributes the instances had (their own, or the
class's) and the attention names: outputs are bit-identical to the unpatched model's. Patching twice changes
nothing the second time.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import Counter
from types import MethodType
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastmm import ops
from fastmm.integrations import kernel_layers, plans
from fastmm.integrations.attention import register_with_transformers
from fastmm.integrations.janus import JanusImageRoute
from fastmm.nn.vq import VQCodebook

logger = logging.getLogger("fastmm")

ATTENTION = "fastmm"
_RECORD = "_fastmm"  # instance attribute holding a module's _Record


class _Saved(enum.Enum):
    ABSENT = "absent"  # the instance had no attribute of its own (its class's is used); survives deepcopy


_ABSENT = _Saved.ABSENT

# The op each swap kind calls, as the module repr names it.
_OPS = {
    plans.RMS_NORM: "ops.modality_rms_norm",
    plans.LAYER_NORM: "ops.modality_layer_norm",
    plans.HEAD_LAYER_NORM: "ops.modality_layer_norm(modality=head)",
    plans.LINEAR: "ops.linear",
    plans.VQ: "nn.VQCodebook",
    plans.VQ_INDICES: "nn.VQCodebook.quantize",
}
# Largest |fastmm - original| / max(1, |original|) a norm swap may show on the probe input: a few roundings.
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
_PROBE_ROWS = 3


@dataclasses.dataclass(frozen=True)
class Entry:
    path: str  # module path in the model ("" = the model itself)
    what: str  # what was swapped / restored, or why not


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` swapped and skipped (with reasons), or what ``unpatch`` restored."""

    swapped: list[Entry] = dataclasses.field(default_factory=list)
    skipped: list[Entry] = dataclasses.field(default_factory=list)
    restored: list[Entry] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line per kind of change with its count, e.g. ``swapped 5 x ops.linear``."""
        lines = []
        for label, entries in (("swapped", self.swapped), ("skipped", self.skipped), ("restored", self.restored)):
            for what, count in Counter(entry.what for entry in entries).items():
                lines.append(f"{label} {count} x {what}")
        return "\n".join(lines) if lines else "nothing to patch"

    def __str__(self) -> str:
        return self.summary()


@dataclasses.dataclass
class _Record:
    """What fastmm changed on one module, enough to run the swap and to undo it."""

    notes: list[str] = dataclasses.field(default_factory=list)  # shown by extra_repr
    saved: dict[str, Any] = dataclasses.field(default_factory=dict)  # attribute -> the instance's own value / _ABSENT
    kind: str | None = None  # swap kind (plans.RMS_NORM, ..., see fastmm.integrations.plans)
    eps: float | None = None  # norms; None: torch.nn.RMSNorm's default (the dtype's epsilon)
    codebook: VQCodebook | None = None  # VQ swaps: sharing the quantizer's codebook Parameter
    attention: Any = None  # the patched root: set_attn_implementation's argument that restores the names
    attention_before: dict[str, str] = dataclasses.field(default_factory=dict)  # the names, by sub-model path
    route: JanusImageRoute | None = None  # Janus image generation


# ----------------------------------------------------------------------------------------- swapped forwards


def _record(module: nn.Module) -> _Record:
    return module.__dict__[_RECORD]


def _original_forward(module: nn.Module, *args, **kwargs):
    saved = _record(module).saved.get("forward", _ABSENT)
    if saved is _ABSENT:
        return type(module).forward(module, *args, **kwargs)
    return saved(*args, **kwargs)


def _modality(x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """Modality ids for the rows of x [..., D]: all 0, or the head index for x [..., H, D]."""
    if heads is None:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    return torch.arange(heads, device=x.device).expand(x.shape[:-1])


def _same_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether fastmm's op computes what the module computes: the module's dtype, no autocast."""
    return all(p is None or p.dtype == x.dtype for p in params) and not torch.is_autocast_enabled(x.device.type)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if not _same_dtype(hidden_states, weight):
        return _original_forward(self, hidden_states)
    eps = _record(self).eps
    eps = torch.finfo(hidden_states.dtype).eps if eps is None else eps
    return ops.modality_rms_norm(hidden_states, _modality(hidden_states), weight[None], eps)


def _layer_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    if not _same_dtype(hidden_states, weight, bias):
        return _original_forward(self, hidden_states)
    bias = None if bias is None else bias[None]
    return ops.modality_layer_norm(hidden_states, _modality(hidden_states), weight[None], bias, _record(self).eps)


def _head_layer_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias  # (H, d)
    per_head = hidden_states.dim() >= 2 and hidden_states.shape[-2] == weight.shape[0]  # x (..., H, d)
    if not per_head or not _same_dtype(hidden_states, weight, bias):
        return _original_forward(self, hidden_states)
    modality = _modality(hidden_states, heads=weight.shape[0])
    return ops.modality_layer_norm(hidden_states, modality, weight, bias, _record(self).eps)


def _linear_forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's argument name)
    weight, bias = self.weight, self.bias
    if not _same_dtype(input, weight, bias):
        return F.linear(input, weight, bias)
    return ops.linear(input, weight, bias)


def _vq_forward(self, hidden_state: torch.Tensor):
    codebook = _record(self).codebook
    if not _same_dtype(hidden_state, codebook.weight):
        return _original_forward(self, hidden_state)
    quantized, loss, indices = codebook(hidden_state)
    return quantized, loss, indices.reshape(-1)  # transformers returns the indices of the flattened rows


def _vq_indices_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    codebook = _record(self).codebook
    if not _same_dtype(hidden_state, codebook.weight):
        return _original_forward(self, hidden_state)
    return codebook.quantize(hidden_state, return_quantized=False)[0]


_FORWARDS: dict[str, Callable] = {
    plans.RMS_NORM: _rms_norm_forward,
    plans.LAYER_NORM: _layer_norm_forward,
    plans.HEAD_LAYER_NORM: _head_layer_norm_forward,
    plans.LINEAR: _linear_forward,
    plans.VQ: _vq_forward,
    plans.VQ_INDICES: _vq_indices_forward,
}
# The kernels-package repositories of the kinds transformers marks kernel-aware (by their layer name).
_KERNEL_REPOSITORIES = {
    kind: kernel_layers.Repository(name, _FORWARDS[kind]) for name, kind in kernel_layers.KERNEL_LAYER_KINDS.items()
}


def _extra_repr(self) -> str:
    saved = _record(self).saved.get("extra_repr", _ABSENT)
    base = type(self).extra_repr(self) if saved is _ABSENT else saved()
    notes = ", ".join(f"fastmm={note}" for note in _record(self).notes)
    return f"{base}, {notes}" if base else notes


def _routed_generate(self, inputs=None, attention_mask=None, logits_processor=None, **kwargs):
    saved = _record(self).saved["generate"]
    original = MethodType(type(self).generate, self) if saved is _ABSENT else saved
    return _record(self).route.generate(self, original, inputs, attention_mask, logits_processor, kwargs)


def _replace(module: nn.Module, name: str, value: Any) -> None:
    """Set an instance attribute, saving the instance's own value the first time."""
    record = module.__dict__.setdefault(_RECORD, _Record())
    record.saved.setdefault(name, module.__dict__.get(name, _ABSENT))
    object.__setattr__(module, name, value)


def _note(module: nn.Module, note: str) -> None:
    _replace(module, "extra_repr", MethodType(_extra_repr, module))
    _record(module).notes.append(note)


# ------------------------------------------------------------------------------------------ choosing swaps


def _weight(module: nn.Module, dims: int) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == dims else None


def _kind_by_structure(module: nn.Module) -> str | None:
    """The swap a module of an unplanned class looks like (the probe confirms norms before they are kept)."""
    if isinstance(module, nn.Linear):
        return plans.LINEAR
    if isinstance(module, nn.LayerNorm):
        return plans.HEAD_LAYER_NORM if _weight(module, 2) is not None else plans.LAYER_NORM
    if type(module).__name__.endswith("RMSNorm") and _weight(module, 1) is not None:
        return plans.RMS_NORM
    return None


def _looks_like_norm(module: nn.Module) -> bool:
    norms = (nn.modules.normalization.GroupNorm, nn.modules.batchnorm._NormBase, nn.LayerNorm)
    return isinstance(module, norms) or type(module).__name__.endswith("Norm")


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return None


def _prepare(module: nn.Module, kind: str) -> _Record | str:
    """The record of a swap of ``kind`` on ``module``, or why it cannot be done."""
    cls = type(module).__name__
    if "_hf_hook" in module.__dict__:
        return f"{cls} runs under an accelerate hook (device map / offloading), which owns its forward"
    if kind == plans.LINEAR:
        if type(module).forward is not nn.Linear.forward:
            return f"{cls} overrides nn.Linear.forward"
        return _Record(kind=kind)
    if kind in (plans.VQ, plans.VQ_INDICES):
        return _Record(kind=kind, codebook=VQCodebook.from_hf(module))
    dims = 2 if kind == plans.HEAD_LAYER_NORM else 1
    weight = _weight(module, dims)
    if weight is None:
        return f"{cls} has no {dims}-d weight for {_OPS[kind]}"
    bias = getattr(module, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return f"{cls}'s bias is not shaped like its weight"
    if kind == plans.LAYER_NORM and tuple(getattr(module, "normalized_shape", weight.shape)) != tuple(weight.shape):
        return f"{cls} normalizes over {module.normalized_shape}, more than its last dim"
    eps = _eps(module)
    if kind != plans.RMS_NORM and eps is None:
        return f"{cls} has no eps"
    return _Record(kind=kind, eps=eps)


@torch.no_grad()
def _probe(module: nn.Module, record: _Record) -> str | None:
    """Run the original forward and the swap on a probe input; None if they agree, else why not."""
    weight = module.weight
    if weight.device.type == "meta":
        return "weights on the meta device: the swap cannot be checked"
    shape = (_PROBE_ROWS, *weight.shape)
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    held = module.__dict__.get(_RECORD)
    module.__dict__[_RECORD] = record
    try:
        expected = type(module).forward(module, probe) if "forward" not in module.__dict__ else module.forward(probe)
        got = _FORWARDS[record.kind](module, probe)
    except Exception as error:  # any module's own code: a refusal to report, never an exception of patch's
        return f"its forward cannot run on a probe input {list(shape)}: {type(error).__name__}: {error}"
    finally:
        if held is None:
            del module.__dict__[_RECORD]
        else:
            module.__dict__[_RECORD] = held
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return f"its forward returns {getattr(expected, 'shape', type(expected))}, not a tensor shaped like its input"
    error = ((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1.0)).item()
    if not error <= _PROBE_TOLERANCE.get(weight.dtype, _PROBE_TOLERANCE[torch.float32]):
        return f"its forward is not {_OPS[record.kind]}'s (relative difference {error:.3g} on a probe input)"
    return None


def _swap(module: nn.Module, kind: str) -> str | None:
    """Swap ``module``'s forward for ``kind``; None when done, else why not."""
    prepared = _prepare(module, kind)
    if isinstance(prepared, str):
        return prepared
    if kind in (plans.RMS_NORM, plans.LAYER_NORM, plans.HEAD_LAYER_NORM):
        refused = _probe(module, prepared)
        if refused is not None:
            return refused
    record = module.__dict__.setdefault(_RECORD, _Record())
    record.kind, record.eps, record.codebook = prepared.kind, prepared.eps, prepared.codebook
    if kernel_layers.kernel_layer_kind(module) == kind and _kernelize(module, kind):
        _note(module, f"{_OPS[kind]} via kernels.kernelize")
        return None
    _replace(module, "forward", MethodType(_FORWARDS[kind], module))
    _note(module, _OPS[kind])
    return None


def _kernelize(module: nn.Module, kind: str) -> bool:
    """Swap a kernel-aware module through the kernels package (fastmm.integrations.kernel_layers); whether it
    took. The instance's own forward and kernel-repository attributes are saved first, so unpatch restores them."""
    saved = _record(module).saved
    for name in ("forward", kernel_layers.KERNEL_REPO_ATTRIBUTE):
        saved.setdefault(name, module.__dict__.get(name, _ABSENT))
    if kernel_layers.kernelize(module, _KERNEL_REPOSITORIES[kind]):
        return True
    for name in ("forward", kernel_layers.KERNEL_REPO_ATTRIBUTE):  # kernels kept the original: undo its traces
        value = saved.pop(name)
        if value is _ABSENT:
            module.__dict__.pop(name, None)
        else:
            object.__setattr__(module, name, value)
    return False


def _walk(model: nn.Module, pretrained: type) -> Iterator[tuple[str, nn.Module, Any]]:
    """(path, module, config of the nearest enclosing PreTrainedModel or None) for each module, once each."""
    seen: set[int] = set()
    stack = [("", model, getattr(model, "config", None) if isinstance(model, pretrained) else None)]
    while stack:
        path, module, config = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, pretrained):
            config = module.config
        yield path, module, config
        children = [(f"{path}.{name}" if path else name, child, config) for name, child in module.named_children()]
        stack.extend(reversed(children))


def _model_type(config: Any) -> str | None:
    return getattr(config, "model_type", None)


def _patch_module(path: str, module: nn.Module, plan: plans.Plan, model_type: str | None, report: PatchReport) -> None:
    cls = type(module).__name__
    record = module.__dict__.get(_RECORD)
    if record is not None and record.kind is not None:  # patched before: idempotent
        report.swapped.append(Entry(path, _OPS[record.kind]))
        return
    structural = _kind_by_structure(module)
    if cls in plan.swaps:
        kind = plan.swaps[cls]
    elif cls in plan.kept:
        report.skipped.append(Entry(path, f"{cls}: {plan.kept[cls]}"))
        return
    elif plan.generic and structural is not None:
        kind = structural
    else:
        if structural is not None:
            report.skipped.append(Entry(path, f"{cls}: not in the {model_type!r} plan of fastmm.integrations.plans"))
        elif _looks_like_norm(module):
            report.skipped.append(Entry(path, f"{cls}: no fastmm op for it"))
        return
    refused = _swap(module, kind)
    if refused is None:
        report.swapped.append(Entry(path, _OPS[kind]))
    else:
        report.skipped.append(Entry(path, f"{cls}: {refused}"))


# ---------------------------------------------------------------------------------------------- attention


def _config_tree(config: Any, name_of: Callable[[Any], Any]) -> dict[str, Any]:
    """set_attn_implementation's nested-dict argument: "" for the config itself, one entry per sub-config."""
    tree: dict[str, Any] = {"": name_of(config)}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            tree[key] = _config_tree(sub, name_of)
    return tree


def _attention_names(model: nn.Module, pretrained: type) -> dict[str, str]:
    """Attention implementation name of every (sub-)PreTrainedModel, by path."""
    walk = _walk(model, pretrained)
    return {path: module.config._attn_implementation for path, module, _ in walk if isinstance(module, pretrained)}


def _patch_attention(model: nn.Module, pretrained: type, report: PatchReport) -> None:
    """Name "fastmm" for every sub-config whose plan says so, in one set_attn_implementation call; record the
    names before (once: patching again keeps the first record)."""
    record = model.__dict__.get(_RECORD)
    if record is not None and record.attention is not None:
        before = record.attention_before
    else:
        before = _attention_names(model, pretrained)
        previous = _config_tree(model.config, lambda config: config._attn_implementation)
        register_with_transformers(ATTENTION)

        def wanted_name(config) -> str:
            return ATTENTION if plans.plan_for(_model_type(config)).attention else config._attn_implementation

        try:
            model.set_attn_implementation(_config_tree(model.config, wanted_name))
        except Exception as error:  # transformers refuses a custom function for this model: reported, not raised
            report.skipped.append(Entry("", f"attention: transformers refused {ATTENTION!r}: {error!r}"))
            return
        if _attention_names(model, pretrained) != before:
            _note(model, f"attn_implementation={ATTENTION!r}")
            _record(model).attention, _record(model).attention_before = previous, before
    for path, module, _ in _walk(model, pretrained):
        if not isinstance(module, pretrained):
            continue
        name = module.config._attn_implementation
        if name == ATTENTION:
            report.swapped.append(Entry(path, f"attention: AttentionInterface {ATTENTION!r} (was {before[path]!r})"))
        elif plans.plan_for(_model_type(module.config)).attention:
            report.skipped.append(Entry(path, f"attention: transformers kept {name!r} for this sub-model"))


def _route_generate(path: str, module: nn.Module, report: PatchReport) -> None:
    """JanusForConditionalGeneration.generate -> fastmm.integrations.janus (image mode)."""
    if "generate" not in module.__dict__.get(_RECORD, _Record()).saved:
        _replace(module, "generate", MethodType(_routed_generate, module))
        _record(module).route = JanusImageRoute()
        _note(module, "generate(generation_mode='image') on fastmm.runtime.generate_image")
    report.swapped.append(Entry(path, "generate(generation_mode='image'): fastmm.runtime.generate_image"))


# --------------------------------------------------------------------------------------------------- API


def patch(model: nn.Module) -> PatchReport:
    """Swap fastmm's ops into ``model`` (a transformers model, loaded) in place, following
    fastmm.integrations.plans; see the module docstring. Returns what was swapped and what was not, with reasons
    (also logged). The Parameters are untouched: the same objects, the same values. Idempotent."""
    from transformers import PreTrainedModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"fastmm.patch: model must be a torch.nn.Module (a transformers model), got {type(model)}")
    report = PatchReport()
    seen_types: set[str | None] = set()
    for path, module, config in _walk(model, PreTrainedModel):
        model_type = _model_type(config)
        plan = plans.plan_for(model_type)
        if plan.generic and model_type not in seen_types:
            seen_types.add(model_type)
            report.skipped.append(Entry(path, f"model_type {model_type!r} has no plan: swapped what its structure shows"))
        if plan.generate == plans.JANUS_IMAGE and callable(getattr(module, "generate", None)):
            _route_generate(path, module, report)
        _patch_module(path, module, plan, model_type, report)
    if isinstance(model, PreTrainedModel):
        _patch_attention(model, PreTrainedModel, report)
    else:
        report.skipped.append(Entry("", f"attention: {type(model).__name__} is not a transformers PreTrainedModel"))
    level = logging.WARNING if seen_types else logging.INFO  # a model type without a plan: say what it got
    logger.log(level, "fastmm.patch(%s):\n%s", type(model).__name__, report.summary())
    for entry in report.skipped:
        logger.debug("fastmm.patch: %s not swapped: %s", entry.path or "<model>", entry.what)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo ``patch``: the modules' own forward / extra_repr / generate attributes (or their classes') and the
    attention names before patching, exactly. Returns what was restored."""
    from transformers import PreTrainedModel

    report = PatchReport()
    for path, module, _ in _walk(model, PreTrainedModel):
        record = module.__dict__.pop(_RECORD, None)
        if record is None:
            continue
        if record.attention is not None:
            module.set_attn_implementation(record.attention)
            report.restored.append(Entry(path, "attention implementation names"))
        for name, value in record.saved.items():
            if value is _ABSENT:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, value)
            if name != "extra_repr":
                report.restored.append(Entry(path, name))
    logger.info("fastmm.unpatch(%s):\n%s", type(model).__name__, report.summary())
    return report
