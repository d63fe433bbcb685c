"""Pieces every Triton family module shares: dtype names and AOT signatures, the SM
count, split-reduction sizing, and the two jit helpers that keep kernels exact under the interpreter (bf16
rounding, tl.dot precision)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 under the interpreter (CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def split_reduction(parallel_tiles: int, reduced_tiles: int, device: torch.device, programs_per_sm: int,
                    min_tiles_per_split: int) -> tuple[int, int]:  # fmt: skip
    """(splits, tiles_per_split) for a kernel that reduces over ``reduced_tiles`` tiles (K of a GEMV, the
    codebook of a nearest-code search) in each of ``parallel_tiles`` programs: enough splits that parallel_tiles
    * splits reaches about programs_per_sm programs per SM, none shorter than min_tiles_per_split tiles. From
    shapes and the SM count only.

    Under the interpreter (CPU tensors): about 4 programs with splits of any length, so the tests run the
    merge of the splits."""
    if device.type == "cuda":
        programs, min_tiles = num_sms(device) * programs_per_sm, min_tiles_per_split
    else:
        programs, min_tiles = 4, 1
    tiles_per_split = triton.cdiv(reduced_tiles, max(1, min(programs // parallel_tiles, reduced_tiles // min_tiles)))
    return triton.cdiv(reduced_tiles, tiles_per_split), tiles_per_split


# Under TRITON_INTERPRET=1 (CPU tensors), triton 3.9's interpreter truncates fp32 -> bf16 casts instead of
# rounding to nearest even, and multiplies bf16 tiles in tl.dot as their raw uint16 bits. The helpers below
# correct for both, in branches the GPU compiler never sees (this flag is False there).
_INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """fp32 x cast to ``dtype`` with round-to-nearest-even, as on the GPU."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # round the low 16 bits away (ties to even)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc):
    """acc + a @ b with fp32 accumulation.

    fp32 inputs use tf32x3 (three TF32 tensor-core products: error about that of fp32 accumulation), a
    deliberate choice over "ieee", whose FMA tiles spill registers at every useful tile size and run far
    below tensor-core rate. The interpreter multiplies in exact fp32 (fp16 / bf16 products are exact in fp32).
    """
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


def aot_signature(kernel, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = ()) -> dict:
    """AOT signature of ``kernel``: pointers as given, constexprs, ``floats`` fp32, any other argument i32."""
    return {
        name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
        for name in kernel.arg_names
    }
