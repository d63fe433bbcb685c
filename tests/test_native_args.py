"""The native argument struct (csrc/tensor_arg.h): every fastmm._C entry point takes tensors, reads them itself
and refuses, with a ValueError naming the argument, any tensor its kernel would misread or read out of bounds;
valid calls through it give the reference backend's results.

The bad-argument tests start from one valid call per entry point and spoil one tensor argument at a time, so
every tensor of every entry point is covered; a spoiled tensor keeps everything else (values, and its shape
where the spoiling is not the shape), so only the check under test can refuse it.
"""

from __future__ import annotations

import pytest
import torch

_C = pytest.importorskip("fastmm._C", reason="the C++ extension fastmm._C is not built")

from fastmm.native import attention, linear, norm, sampling, vq  # noqa: E402
from fastmm.reference import attention as ref_attention  # noqa: E402
from fastmm.reference import linear as ref_linear  # noqa: E402
from fastmm.reference import norm as ref_norm  # noqa: E402
from fastmm.reference import sampling as ref_sampling  # noqa: E402
from fastmm.reference import vq as ref_vq  # noqa: E402


# ---- one valid call per entry point --------------------------------------------------------------------------


def _norm_args(fwd: bool, layer: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    T, D, M = 3, 8, 2

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    args = {}
    if fwd:
        args.update(x=randn(T, D), modality=torch.tensor([0, 1, 1]), weight=randn(M, D))
        if layer:
            args["bias"] = randn(M, D)
        args.update(residual=randn(T, D), y=torch.empty(T, D), residual_out=torch.empty(T, D))
        if layer:
            args["mean"] = torch.empty(T)
        args.update(rstd=torch.empty(T), eps=1e-6)
    else:
        args.update(dy=randn(T, D), dresidual_out=randn(T, D), x_in=randn(T, D), modality=torch.tensor([0, 1, 1]),
                    weight=randn(M, D))  # fmt: skip
        if layer:
            args["mean"] = randn(T)
        args.update(rstd=randn(T).abs() + 0.5, dx=torch.empty(T, D), dweight=torch.empty(M, D))
        if layer:
            args["dbias"] = torch.empty(M, D)
    args["num_threads"] = 1
    return args


def _attention_args(decode: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, Lq, S, d = 2, 4, 2, 3, 5, 16
    q, k, v = (torch.randn(B, H, Lq if H == Hq else S, d, generator=g) for H in (Hq, Hkv, Hkv))
    mask = torch.ones(B, Lq, S, dtype=torch.bool)
    bias = torch.zeros(B, Lq, S)
    outputs = {"o": torch.empty(B, Hq, Lq, d), "lse": torch.empty(B, Hq, Lq)}
    if decode:
        return {"q": q, "k_cache": k, "v_cache": v, "cache_len": torch.tensor([3, 5], dtype=torch.int32), **outputs,
                "allowed": mask, "bias": bias, "scale": 0.25, "softcap": 0.0, "num_threads": 1}  # fmt: skip
    kv_start = torch.zeros(B, Lq, dtype=torch.int32)
    kv_end = torch.full((B, Lq), S, dtype=torch.int32)
    return {"q": q, "k": k, "v": v, "kv_start": kv_start, "kv_end": kv_end, **outputs,
            "key_keep": torch.ones(B, S, dtype=torch.bool), "allowed": mask, "bias": bias, "scale": 0.25,
            "softcap": 0.0, "num_threads": 1}  # fmt: skip


def _valid_args(entry: str) -> dict:
    """fastmm._C.<entry>'s arguments, in order, for a call that succeeds: every optional tensor given."""
    g = torch.Generator().manual_seed(2)
    if entry == "skinny_linear":
        return {"x": torch.randn(3, 20, generator=g), "weight": torch.randn(5, 20, generator=g),
                "bias": torch.randn(5, generator=g), "y": torch.empty(3, 5), "num_threads": 1}  # fmt: skip
    if entry == "nearest_code":
        codebook = torch.randn(7, 4, generator=g)
        return {"z": torch.randn(2, 3, 4, generator=g), "codebook": codebook, "codebook_sq": codebook.square().sum(1),
                "indices": torch.empty(2, 3, dtype=torch.int64), "num_threads": 1}  # fmt: skip
    if entry == "cfg_sample":
        return {"logits": torch.randn(4, 10, generator=g), "offset": torch.tensor([3]),
                "out": torch.empty(2, dtype=torch.int64), "scales": [2.0], "temperature": 1.0, "top_k": 0,
                "top_p": 1.0, "lo": 0, "hi": 10, "log_softmax": False, "seed": 7, "num_threads": 1}  # fmt: skip
    if entry == "jacobi_verify":
        N, W, V = 2, 3, 10
        return {"logits": torch.randn(2 * N, W, V, generator=g), "drafts": torch.randint(1, 9, (N, W), generator=g),
                "draft_probs": torch.full((N, W, 8), 0.125), "start": torch.tensor([0, 4]),
                "count": torch.empty(N, dtype=torch.int64), "tokens": torch.empty(N, W, dtype=torch.int64),
                "probs": torch.empty(N, W, 8), "scales": [2.0], "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                "lo": 1, "hi": 9, "log_softmax": False, "seed": 7, "limit": 6, "num_threads": 1}  # fmt: skip
    if entry == "fusion_depthwise_gelu":
        B, gh, gw, d, k = 2, 3, 4, 8, 3
        return {"y": torch.randn(B, gh * gw, d, generator=g), "s": torch.randn(B, gh * gw, d, generator=g),
                "weight": torch.randn(k * k, d, generator=g), "bias": torch.randn(d, generator=g), "grid_h": gh,
                "grid_w": gw, "h": torch.empty(B, gh * gw, d), "sums": torch.empty(B, 3, d), "num_threads": 1}  # fmt: skip
    if entry == "fusion_blend":
        B, n, d = 2, 6, 8
        return {"y": torch.randn(B, n, d, generator=g), "s": torch.randn(B, n, d, generator=g),
                "proj": torch.randn(B, n, d, generator=g), "bias": torch.randn(d, generator=g),
                "gate": torch.randn(B, generator=g), "out": torch.empty(B, n, d), "num_threads": 1}  # fmt: skip
    if entry in ("span_attention_fwd", "decode_attention_fwd"):
        return _attention_args(decode=entry == "decode_attention_fwd")
    if entry == "attention_importance_fwd":
        B, Hq, Hkv, R, S, n, d = 2, 4, 2, 3, 6, 5, 8
        return {"q_rows": torch.randn(B, Hq, R, d, generator=g), "k": torch.randn(B, Hkv, S, d, generator=g),
                "row_start": torch.zeros(B, R, dtype=torch.int32),
                "row_end": torch.full((B, R), S, dtype=torch.int32), "lse": torch.full((B, Hq, R), 3.0),
                "span_index": torch.tensor([[0, 2, 3, 5, -1]] * B, dtype=torch.int32), "out": torch.empty(B, n),
                "scale": 0.25, "num_threads": 1}  # fmt: skip
    if entry == "compact_tokens_fwd":
        B, L, D, capacity = 2, 5, 4, 3
        return {"hidden": torch.randn(B, L, D, generator=g), "positions": torch.arange(B * L).view(B, L),
                "keep": torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool),
                "hidden_out": torch.empty(B, capacity, D), "positions_out": torch.empty(B, capacity).long(),
                "count": torch.empty(B, dtype=torch.int32), "source": torch.empty(B, capacity).long(),
                "num_threads": 1}  # fmt: skip
    layer, fwd = entry.startswith("layer"), entry.endswith("fwd")
    return _norm_args(fwd, layer)


ENTRIES = ["rms_norm_fwd", "layer_norm_fwd", "rms_norm_bwd", "layer_norm_bwd", "nearest_code", "skinny_linear",
           "span_attention_fwd", "decode_attention_fwd", "cfg_sample", "fusion_depthwise_gelu", "fusion_blend",
           "attention_importance_fwd", "compact_tokens_fwd", "jacobi_verify"]  # fmt: skip
# Tensors an entry point accepts as None.
OPTIONAL = {"residual", "residual_out", "bias", "dresidual_out", "dbias", "key_keep", "allowed", "offset"}
# Tensors read through any non-negative strides (their spoiled layout is negative strides only).
STRIDED = {"z"}


def _call(entry: str, args: dict):
    return getattr(_C, entry)(*args.values())


def _tensor_cases(required_only: bool = False) -> list:
    cases = []
    for entry in ENTRIES:
        for name, value in _valid_args(entry).items():
            if isinstance(value, torch.Tensor) and not (required_only and name in OPTIONAL):
                cases.append(pytest.param(entry, name, id=f"{entry}-{name}"))
    return cases


def _refused(entry: str, name: str, bad, *words: str, base: dict | None = None) -> None:
    """entry, called with base's arguments (default: _valid_args(entry)) but argument name replaced by bad,
    raises a ValueError that names the argument ("<name> must be") and contains each of words."""
    args = base or _valid_args(entry)
    _call(entry, dict(args))  # the unspoiled call passes, so the spoiled argument is what fails
    args[name] = bad
    with pytest.raises(ValueError) as info:
        _call(entry, args)
    message = str(info.value)
    assert message.startswith("native "), message
    assert f"{name} must be" in message, f"{entry}: {message!r} does not name {name}"
    for word in words:
        assert word in message, f"{entry}: {message!r} lacks {word!r}"


# ---- every tensor of every entry point is checked ------------------------------------------------------------


def test_every_entry_point_is_listed():
    """A new entry point must get a valid call here, or its argument checks go untested. decode_layer takes raw
    pointers (built once per runner, called per layer; it and its scratch size have their own tests)."""
    entry_points = {name for name in dir(_C) if not name.startswith("_") and callable(getattr(_C, name))}
    assert entry_points - {"decode_layer", "decode_layer_scratch_size"} == set(ENTRIES)


@pytest.mark.parametrize("entry,name", _tensor_cases())
def test_wrong_dtype_is_refused(entry, name):
    t = _valid_args(entry)[name]
    _refused(entry, name, t.double(), "got torch.float64")


@pytest.mark.parametrize("entry,name", _tensor_cases())
def test_wrong_device_is_refused(entry, name):
    t = _valid_args(entry)[name]
    _refused(entry, name, t.to("meta"), "CPU", "on meta")


@pytest.mark.parametrize("entry,name", _tensor_cases())
def test_wrong_shape_is_refused(entry, name):
    t = _valid_args(entry)[name]
    _refused(entry, name, t.unsqueeze(0), f"shape {tuple(t.unsqueeze(0).shape)}")


@pytest.mark.parametrize("entry,name", _tensor_cases(required_only=True))
def test_none_for_a_required_tensor_is_refused(entry, name):
    _refused(entry, name, None, "got None")


def _gapped(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view with a stride of 2 along the last dim: not contiguous, nor unit-stride rows."""
    out = torch.empty(*t.shape, 2, dtype=t.dtype)[..., 0]
    return out.copy_(t)


@pytest.mark.parametrize("entry,name", [c for c in _tensor_cases() if c.values[1] not in STRIDED])
def test_non_contiguous_is_refused(entry, name):
    t = _valid_args(entry)[name]
    if t.shape[-1] == 1:
        pytest.skip("a last dim of size 1 is contiguous with any stride")
    gapped = _gapped(t)
    assert not gapped.is_contiguous()
    _refused(entry, name, gapped, f"strides {gapped.stride()}")


def test_rows_need_unit_stride_along_the_last_dim_only():
    """linear's x and weight and sampling's logits are read row by row: any row stride is fine."""
    args = _valid_args("skinny_linear")
    x, weight = args["x"], args["weight"]
    args["x"] = torch.cat([x, torch.randn(3, 4)], dim=1)[:, :20]  # rows 24 elements apart
    args["weight"] = torch.cat([weight, torch.randn(5, 9)], dim=1)[:, :20]
    _call("skinny_linear", args)
    torch.testing.assert_close(args["y"], ref_linear.linear_fwd(x, weight, args["bias"]))


def _outside_storage(t: torch.Tensor) -> torch.Tensor:
    """A view with t's shape, strides and values whose last element lies past the end of its storage: a view
    made inside a storage that is then shrunk (torch.as_strided itself refuses views outside their storage)."""
    out = t.clone()
    out.untyped_storage().resize_(out.untyped_storage().nbytes() - out.element_size())
    return out


@pytest.mark.parametrize("entry,name", _tensor_cases())
def test_view_outside_its_storage_is_refused(entry, name):
    t = _valid_args(entry)[name]
    _refused(entry, name, _outside_storage(t), "inside its storage", f"in a storage of {t.nbytes - t.element_size()}")


def test_as_strided_views_are_checked_against_their_storage():
    """A strided view of z (vq reads z through its strides) reaching the last element of its storage passes;
    the same view one element further is refused, also when torch would allow it (a larger storage that is
    then shrunk)."""
    args = _valid_args("nearest_code")
    storage = torch.randn(2 * 3 * 4)
    args["z"] = storage.as_strided((2, 3, 4), (12, 1, 3))  # channels-first: the last element is storage[23]
    _call("nearest_code", args)
    torch.testing.assert_close(args["indices"], ref_vq.nearest_code(args["z"], args["codebook"], args["codebook_sq"]))
    with pytest.raises(RuntimeError, match="out of bounds"):
        storage.as_strided((2, 3, 4), (12, 1, 3), 1)
    bigger = torch.randn(25)
    shifted = bigger.as_strided((2, 3, 4), (12, 1, 3), 1)
    bigger.untyped_storage().resize_(24 * 4)
    _refused("nearest_code", "z", shifted, "inside its storage", "storage offset 1 in a storage of 96 bytes")


class _ReportsNegativeStrides(torch.Tensor):
    """A tensor whose stride() negates its first stride: torch cannot make one (as_strided refuses negative
    strides), but the struct must not trust that."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def stride(self, *dim):
        strides = super().stride()
        return (-strides[0], *strides[1:])


@pytest.mark.parametrize("entry,name", _tensor_cases())
def test_negative_strides_are_refused(entry, name):
    t = _valid_args(entry)[name]
    if t.shape[0] == 1:
        pytest.skip("a dim of size 1 is never stepped")
    with pytest.raises(RuntimeError, match="[Nn]egative strides"):
        t.as_strided(t.shape, (-t.stride(0), *t.stride()[1:]))
    lying = torch.Tensor._make_subclass(_ReportsNegativeStrides, t)
    _refused(entry, name, lying, f"strides ({-t.stride(0)},")


def test_message_names_the_kernel_the_argument_the_expectation_and_the_tensor():
    args = _valid_args("skinny_linear")
    args["weight"] = args["weight"].half()
    with pytest.raises(ValueError) as info:
        _call("skinny_linear", args)
    assert str(info.value) == (
        "native linear kernel: weight must be a CPU torch.float32 tensor of shape (*, 20) with unit stride along "
        "its last dim and non-negative strides, got torch.float16 shape (5, 20) strides (20, 1) on cpu"
    )


def test_anything_but_a_tensor_or_none_is_a_type_error():
    args = _valid_args("skinny_linear")
    args["x"] = args["x"].tolist()
    with pytest.raises(TypeError):
        _call("skinny_linear", args)


# ---- what a TensorSpec cannot say ----------------------------------------------------------------------------


def test_values_the_kernels_index_with_are_checked():
    args = _norm_args(fwd=True, layer=False)
    args["modality"] = torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match=r"native norm kernel: modality ids must be in \[0, 2\), got values in \[0, 2\]"):
        _call("rms_norm_fwd", args)
    args = _norm_args(fwd=False, layer=True)
    args["modality"] = torch.tensor([0, -1, 1])
    with pytest.raises(ValueError, match=r"modality ids must be in \[0, 2\)"):
        _call("layer_norm_bwd", args)
    args = _attention_args(decode=False)
    args["kv_end"][1, 2] = 6
    with pytest.raises(ValueError, match=r"key ranges must satisfy 0 <= kv_start <= kv_end <= S = 5"):
        _call("span_attention_fwd", args)
    args = _attention_args(decode=True)
    args["cache_len"][0] = 2
    with pytest.raises(ValueError, match=r"cache_len must lie in \[Lq = 3, S = 5\], got values in \[2, 5\]"):
        _call("decode_attention_fwd", args)


def test_sizes_that_depend_on_other_arguments_are_checked():
    _refused("nearest_code", "codebook", torch.empty(0, 4), "at least one code")
    _refused("span_attention_fwd", "k", torch.randn(2, 3, 5, 16), "dividing Hq = 4")  # Hkv = 3
    _refused("cfg_sample", "logits", torch.randn(3, 10), "[G*B, V] with G = 2")
    _refused("cfg_sample", "logits", torch.randn(4, 12)[:, :10].t().contiguous().t(), "unit stride")
    overlapping = torch.randn(30).as_strided((4, 10), (5, 1))  # rows 5 apart overlap: V = 10
    _refused("cfg_sample", "logits", overlapping, "at least V elements apart")


def test_residual_out_comes_exactly_with_residual():
    without_residual = {**_norm_args(fwd=True, layer=False), "residual": None, "residual_out": None}
    _refused("rms_norm_fwd", "residual_out", torch.empty(3, 8), "given exactly when residual is", base=without_residual)


# ---- the launchers pass bad tensors through to the checks ----------------------------------------------------


def test_launchers_refuse_what_they_do_not_copy():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="native linear kernel: weight must be"):
        linear.skinny_linear(x, weight.double(), None)
    with pytest.raises(ValueError, match="native linear kernel: bias must be"):
        linear.linear_fwd(x, weight, torch.randn(5))
    with pytest.raises(ValueError, match="native vq kernel: z must be .* inside its storage"):
        z = _outside_storage(torch.randn(1, 4, 3).transpose(1, 2))  # channels-first, read in place
        vq.nearest_code(z, torch.randn(5, 4), torch.randn(5))
    with pytest.raises(ValueError, match=r"native norm kernel: modality ids must be in \[0, 2\)"):
        norm.rms_norm_fwd(torch.randn(2, 8), torch.tensor([0, 2]), torch.randn(2, 8), None, 1e-6)
    with pytest.raises(ValueError, match="native norm kernel: rstd must be"):
        norm.rms_norm_bwd(torch.randn(2, 8), None, torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(2, 8),
                                 torch.ones(3))  # fmt: skip
    with pytest.raises(ValueError, match="native sampling kernel: logits must be"):
        sampling.cfg_sample_fwd(torch.randn(10, 2).t(), (), 1.0, 0, 1.0, 0, 10, False, 0, None, None)
    with pytest.raises(ValueError, match="native sampling kernel: offset must be"):
        sampling.cfg_sample_fwd(torch.randn(2, 10), (), 1.0, 0, 1.0, 0, 10, False, 0, torch.tensor([1.0]), None)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="native attention kernel: key ranges"):
        attention.span_attention_fwd(q, q, q, torch.zeros(1, 3, dtype=torch.int32),
                                            torch.full((1, 3), 4, dtype=torch.int32), 0.5)  # fmt: skip
    with pytest.raises(ValueError, match=r"native attention kernel: cache_len must lie in \[Lq = 3, S = 3\]"):
        attention.decode_attention_fwd(q, q, q, torch.tensor([4], dtype=torch.int32), 0.5)


# ---- valid calls through the struct give the reference's results ---------------------------------------------


@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (3, 37, 11)])
def test_skinny_linear_matches_the_reference(M, K, N):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K + 5, generator=g)[:, :K]  # rows K + 5 apart
    weight = torch.randn(N, K, generator=g)
    for bias in (None, torch.randn(N, generator=g)):
        torch.testing.assert_close(linear.skinny_linear(x, weight, bias), ref_linear.linear_fwd(x, weight, bias),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("T,D,M", [(1, 64, 2), (5, 33, 3)])
def test_norms_match_the_reference(T, D, M):
    g = torch.Generator().manual_seed(T)
    x, residual, dy = (torch.randn(T, D, generator=g) for _ in range(3))
    modality = torch.randint(0, M, (T,), generator=g)
    weight, bias = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    close = dict(rtol=1e-5, atol=1e-5)
    for res in (None, residual):
        torch.testing.assert_close(norm.rms_norm_fwd(x, modality, weight, res, 1e-6),
                                   ref_norm.rms_norm_fwd(x, modality, weight, res, 1e-6), **close)  # fmt: skip
        torch.testing.assert_close(norm.layer_norm_fwd(x, modality, weight, bias, res, 1e-6),
                                   ref_norm.layer_norm_fwd(x, modality, weight, bias, res, 1e-6), **close)  # fmt: skip
    _, _, rstd = ref_norm.rms_norm_fwd(x, modality, weight, None, 1e-6)
    _, _, mean, lrstd = ref_norm.layer_norm_fwd(x, modality, weight, bias, None, 1e-6)
    torch.testing.assert_close(norm.rms_norm_bwd(dy, residual, x, modality, weight, rstd),
                               ref_norm.rms_norm_bwd(dy, residual, x, modality, weight, rstd), **close)  # fmt: skip
    torch.testing.assert_close(norm.layer_norm_bwd(dy, None, x, modality, weight, mean, lrstd, True),
                               ref_norm.layer_norm_bwd(dy, None, x, modality, weight, mean, lrstd, True), **close)  # fmt: skip


@pytest.mark.parametrize("B,D,S,K", [(1, 4, 9, 7), (2, 8, 30, 600)])
def test_nearest_code_matches_the_reference_on_a_channels_first_view(B, D, S, K):
    g = torch.Generator().manual_seed(K)
    z = torch.randn(B, D, S, generator=g).transpose(1, 2)  # [B, S, D] with stride 1 along S
    codebook = torch.randn(K, D, generator=g)
    codebook_sq = codebook.square().sum(1)
    torch.testing.assert_close(vq.nearest_code(z, codebook, codebook_sq),
                               ref_vq.nearest_code(z, codebook, codebook_sq))  # fmt: skip


@pytest.mark.parametrize("B,Hq,Hkv,L,d", [(1, 2, 1, 5, 16), (2, 4, 2, 19, 40)])
def test_attention_matches_the_reference(B, Hq, Hkv, L, d):
    g = torch.Generator().manual_seed(L)
    q = torch.randn(B, Hq, L, d, generator=g)
    k, v = (torch.randn(B, Hkv, L, d, generator=g) for _ in range(2))
    kv_start = torch.randint(0, L // 2 + 1, (B, L), generator=g, dtype=torch.int32)
    kv_end = torch.maximum(kv_start, torch.randint(0, L + 1, (B, L), generator=g, dtype=torch.int32))
    mask = torch.rand(B, L, L, generator=g) > 0.2
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attention.span_attention_fwd(q, k, v, kv_start, kv_end, d**-0.5, mask=mask),
                               ref_attention.span_attention_fwd(q, k, v, kv_start, kv_end, d**-0.5, mask=mask),
                               **close)  # fmt: skip
    cache_len = torch.randint(3, L + 1, (B,), generator=g, dtype=torch.int32)
    torch.testing.assert_close(attention.decode_attention_fwd(q[:, :, :3], k, v, cache_len, d**-0.5),
                               ref_attention.decode_attention_fwd(q[:, :, :3], k, v, cache_len, d**-0.5), **close)  # fmt: skip


@pytest.mark.parametrize("scales,B,V", [((), 1, 17), ((3.0, 1.5), 2, 300)])
def test_cfg_sample_matches_the_reference(scales, B, V):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn((len(scales) + 1) * B, V + 3, generator=g)[:, :V]  # rows V + 3 apart
    offset = torch.tensor([5])
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.9)):
        args = (logits, scales, temperature, top_k, top_p, 1, V - 1, False, 11, offset, None)
        torch.testing.assert_close(sampling.cfg_sample_fwd(*args), ref_sampling.cfg_sample_fwd(*args))
