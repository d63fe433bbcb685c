"""Op family `sampling`: every backend draws the reference's ids for the same (seed, offset).

Mixing, scaling and the race's RNG are fp32 operations that every backend repeats in the reference's order, so
with mix "logits" and no top-p the ids must be identical. log_softmax (a sum over V) and top-p (sums of
probabilities) round differently per backend: there an id may differ only at a near-tie, which
assert_same_draws checks instead. The Triton interpreter is slow (milliseconds per program), so triton runs a
subset of each grid and many draws come from many rows of one call (each row has its own RNG stream)."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases

import fastmm
from fastmm.reference import sampling as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# V: 1, a prime below one tile, a range inside a vocabulary (lo, hi not tile-aligned), more than 16 tiles.
SHAPES = {"V=1": (1, None), "V=7": (7, None), "V=1000 allowed": (1000, (100, 901)), "V=16385": (16385, None)}
OPTIONS = {  # (temperature, top_k, top_p)
    "greedy": (0.0, None, None),
    "race": (0.7, None, None),
    "top_k": (1.0, 50, None),
    "top_p": (1.0, None, 0.9),
    "top_k+top_p": (0.8, 20, 0.7),
}
SCALES = {1: (), 2: (4.5,), 3: (2.5, 1.7)}


def _logits(groups, batch, vocab, dtype=torch.float32, device="cpu", seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(groups * batch, vocab, generator=gen) * spread).to(dtype).to(device)


def _sample(backend, logits, **kwargs):
    with fastmm.use_backend(backend):
        return fastmm.ops.cfg_sample(logits, **kwargs)


# The cases the interpreter runs (a top-k or top-p search is 32 passes of milliseconds each): every option and
# mix at V = 7, and a few at the other shapes.
TRITON_CASES = {("V=7", option, mix) for option in OPTIONS for mix in ref.MIXES} | {
    ("V=1", "greedy", "logits"), ("V=1", "race", "log_softmax"), ("V=1000 allowed", "greedy", "logits"),
    ("V=1000 allowed", "race", "log_softmax"), ("V=1000 allowed", "top_k+top_p", "logits"),
    ("V=16385", "race", "logits"),
}  # fmt: skip


def assert_same_draws(label, ids, expected, logits, kwargs):
    """ids equal to the reference's. With log_softmax or top-p, where summation order enters, a row may differ
    only at a near-tie: the two ids' race keys agree within 1e-4, or the top-p boundary is near (the kept set
    changes when top_p moves by 1e-4). The backend's id must be kept in any case."""
    if kwargs.get("mix", "logits") == "logits" and kwargs.get("top_p") is None:
        torch.testing.assert_close(ids.cpu(), expected.cpu(), rtol=0, atol=0, msg=label)
        return
    temperature, top_k, top_p = kwargs.get("temperature", 1.0), kwargs.get("top_k") or 0, kwargs.get("top_p") or 1.0
    lo, hi = kwargs.get("allowed") or (0, logits.shape[1])
    z = ref.guided_scores(logits.cpu(), kwargs.get("scales", ()), kwargs.get("mix") == "log_softmax")[:, lo:hi]
    s = z if temperature == 0 else z / temperature
    noise = ref.race_noise(kwargs.get("seed", 0), kwargs.get("offset"), len(z), lo, hi, "cpu")
    keys = s if temperature == 0 else s + noise
    loose, tight = (ref.kept_mask(s, top_k, min(1.0, top_p + d)) for d in (1e-4, -1e-4))
    for row in (ids.cpu() != expected.cpu()).nonzero().flatten().tolist():
        got, want = int(ids[row]) - lo, int(expected[row]) - lo
        near_tie = abs(float(keys[row, got] - keys[row, want])) <= 1e-4 * (1 + abs(float(keys[row, want])))
        near_boundary = top_p < 1 and bool((loose[row] != tight[row]).any())
        assert loose[row, got] and (near_tie or near_boundary), f"{label}: row {row} drew {got + lo}, not {want + lo}"


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends_draw_the_reference_ids(backend, device, groups, dtype):
    for (shape, (vocab, allowed)), (option, (temperature, top_k, top_p)), mix in (
        (s, o, m) for s in SHAPES.items() for o in OPTIONS.items() for m in ref.MIXES
    ):
        if backend == "triton" and (shape, option, mix) not in TRITON_CASES:
            continue
        label = f"{shape} {option} {mix}"
        logits = _logits(groups, 2, vocab, dtype, device, seed=vocab + groups)
        kwargs = {"scales": SCALES[groups], "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "allowed": allowed, "mix": mix, "seed": 7, "offset": torch.tensor([3], device=device)}  # fmt: skip
        ids = _sample(backend, logits, **kwargs)
        lo, hi = allowed or (0, vocab)
        expected = ref.cfg_sample_fwd(logits, SCALES[groups], temperature, top_k or 0, top_p or 1.0, lo, hi,
                                  mix == "log_softmax", 7, kwargs["offset"], None)  # fmt: skip
        assert ids.shape == (2,) and ids.dtype == torch.int64 and ids.device == logits.device, label
        assert ((ids >= lo) & (ids < hi)).all(), f"{label}: ids {ids.tolist()} outside [{lo}, {hi})"
        assert_same_draws(f"{backend} {dtype} G={groups} {label}", ids, expected, logits, kwargs)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_greedy_guidance_is_transformers_arithmetic(backend, device):
    """G = 2 greedy is torch.argmax(u + (c - u) * s) exactly in fp32 (transformers'
    ClassifierFreeGuidanceLogitsProcessor), G = 3 its Chameleon extension: no FMA anywhere. A scale that is
    not a power of two over 16385 ids would expose a contracted multiply-add."""
    logits = _logits(3, 4, 16385, device=device, seed=1)
    c, i, u = logits[:4], logits[4:8], logits[8:]
    guided2 = _sample(backend, logits[:8], scales=(7.3,), temperature=0)
    guided3 = _sample(backend, logits, scales=(7.3, 1.9), temperature=0)
    torch.testing.assert_close(guided2, torch.argmax(i + (c - i) * 7.3, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(guided3, torch.argmax(u + (i - u) * 1.9 + (c - i) * 7.3, dim=1), rtol=0, atol=0)


def test_greedy_matches_transformers_processor():
    generation = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(2, 3, 4099, seed=2)
    processor = generation.ClassifierFreeGuidanceLogitsProcessor(3.3)
    expected = processor(torch.zeros(3, 1, dtype=torch.long), logits).argmax(dim=1)  # input_ids: B rows
    for backend in ("reference", "native"):
        torch.testing.assert_close(_sample(backend, logits, scales=(3.3,), temperature=0), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the interpreter
def test_greedy_ties_nan_and_infinities(backend, device):
    """Ties go to the lowest id, within a tile and across tiles; a NaN never wins; a row of -inf or NaN
    gives the first allowed id; +inf wins."""
    logits = torch.full((5, 2000), -1.0)
    logits[0, [1500, 5, 1999]] = 3.0  # tie across tiles: 5
    logits[1, 0], logits[1, 7] = float("nan"), 2.0  # NaN at a lower id never wins: 7
    logits[2] = float("-inf")  # nothing to choose: lo
    logits[3] = float("nan")
    logits[4, [9, 1200]] = float("inf")  # +inf wins, ties to the lowest: 9
    logits = logits.to(device)
    for allowed, expected in ((None, [5, 7, 0, 0, 9]), ((6, 1600), [1500, 7, 6, 6, 9])):
        ids = _sample(backend, logits, temperature=0, allowed=allowed)
        assert ids.tolist() == expected, f"allowed {allowed}: {ids.tolist()}"
    # Sampling: a NaN id is never drawn, an all -inf row gives lo, +inf ids beat every finite one.
    ids = _sample(backend, logits[1:], temperature=1.0, top_p=0.9, seed=3)
    assert ids[0] != 0 and ids[1:].tolist() == [0, 0, 9]


def _triton_device():
    """CUDA when present, else CPU tensors through the interpreter; skips where triton cannot run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok, reason = fastmm.backend.backend_status("triton", torch.device(device))
    if not ok:
        pytest.skip(reason)
    return device


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "race"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_vocabulary_draws_the_reference_ids(groups, temperature, dtype):
    """The split kernel (chunks of whole tiles per program, then a merge) draws the reference's ids: allowed
    ranges that do not start or end on a tile, a last chunk shorter than the others, more splits asked for than
    tiles, ties across chunks (the lowest id), NaN, an all -inf row (lo) and +inf."""
    from fastmm.triton.sampling import cfg_sample_in_chunks

    device = _triton_device()
    logits = _logits(groups, 6, 3000, spread=3.0)
    logits[0, [2500, 1100, 40]] = 50.0  # a tie across chunks (greedy: 40; allowed from 100: 1100)
    logits[1, :] = float("-inf")
    logits[2, 2000] = float("inf")
    logits[3, :1500] = float("nan")
    logits = logits.to(dtype).to(device)
    scales = SCALES[groups]
    offset = torch.tensor([4], device=device)
    for (lo, hi), splits in (((0, 3000), 3), ((100, 2901), 2), ((5, 1030), 64)):
        ids = cfg_sample_in_chunks(logits, scales, temperature, 0, 1.0, lo, hi, False, 7, offset, None, splits)
        expected = ref.cfg_sample_fwd(logits.cpu(), scales, temperature, 0, 1.0, lo, hi, False, 7, offset.cpu(), None)
        assert ids.tolist() == expected.tolist(), f"allowed [{lo}, {hi}), splits {splits}"


def test_split_vocabulary_refuses_whole_row_statistics():
    from fastmm.triton.sampling import _vocab_splits, cfg_sample_in_chunks

    device = _triton_device()
    logits = _logits(2, 1, 3000).to(device)
    for options in ((1.0, 0, 0.9, False), (1.0, 10, 1.0, False), (1.0, 0, 1.0, True)):
        temperature, top_k, top_p, log_softmax = options
        with pytest.raises(ValueError, match="splits > 1 needs raw logits without top-k / top-p"):
            cfg_sample_in_chunks(logits, (5.0,), temperature, top_k, top_p, 0, 3000, log_softmax, 0, None, None, 2)
    assert _vocab_splits(torch.device("cpu"), 1, 16384) == 1  # the interpreter runs one program per row


@pytest.mark.parametrize("backend,device", backend_cases())
def test_top_k_1_is_greedy(backend, device):
    logits = _logits(2, 4, 1000, device=device, seed=4)
    greedy = _sample(backend, logits, scales=(3.0,), temperature=0)
    for seed in range(2):
        drawn = _sample(backend, logits, scales=(3.0,), temperature=0.7, top_k=1, seed=seed)
        torch.testing.assert_close(drawn, greedy, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_ties_at_the_threshold_are_kept(backend, device):
    """Scores 3, 2, 2, 2, 0, 0. top_k = 2: the 2nd largest is a 2, so all three 2s are kept (ids 0-3).
    top_p = 0.5: the 3 alone holds 45% of the mass, so the threshold falls on the 2s and keeps all three.
    Over 12 draws ids 4 and 5 never come, and at least two of the 2s do."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0, 0.0]]).expand(12, 6).contiguous().to(device)
    for option in ({"top_k": 2}, {"top_p": 0.5}):
        drawn = set(_sample(backend, logits, seed=5, **option).tolist())
        assert drawn <= {0, 1, 2, 3} and len(drawn & {1, 2, 3}) >= 2, f"{option}: drew {sorted(drawn)}"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_draws_stay_in_the_reference_kept_set(backend, device):
    """Many seeds and offsets (one RNG stream per row): every id lies in the kept set the reference computes,
    on logits with many exact ties (multiples of 0.5)."""
    rows = 2 if backend == "triton" else 128
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randint(-12, 12, (2, 300), generator=gen) * 0.5).repeat_interleave(rows, 0).to(device)
    for temperature, top_k, top_p in ((1.0, 37, None), (1.0, None, 0.6), (0.6, 60, 0.8)):
        z = ref.guided_scores(logits.cpu(), (2.0,), False)
        kept = ref.kept_mask(z / temperature, top_k or 0, top_p or 1.0)
        for seed, step in ((0, 0), (1, 5), (2**32 - 1, 2**40)):
            ids = _sample(backend, logits, scales=(2.0,), temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, offset=torch.tensor([step], device=device)).cpu()  # fmt: skip
            assert kept.gather(1, ids[:, None]).all(), f"T={temperature} k={top_k} p={top_p}: ids outside"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_seed_and_offset_decide_the_draws(backend, device):
    logits = _logits(2, 16, 1000, device=device, seed=7, spread=0.5)
    step = torch.tensor([4], device=device)

    def draw(seed=1, offset=step):
        return _sample(backend, logits, scales=(2.0,), seed=seed, offset=offset)

    first = draw()
    torch.testing.assert_close(draw(), first, rtol=0, atol=0)  # reproducible
    assert step.item() == 4, "the op must not change offset"
    assert (draw(offset=torch.tensor([5], device=device)) != first).sum() >= 12
    assert (draw(seed=2) != first).sum() >= 12
    assert (draw(offset=torch.tensor([4 + 2**32], device=device)) != first).sum() >= 12  # the high bits count
    torch.testing.assert_close(draw(offset=None), draw(offset=torch.tensor([0], device=device)), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_empirical_distribution_matches_softmax(backend, device):
    """Frequencies of the draws against softmax((u + s (c - u)) / T) at V = 4: within 4 standard errors plus
    0.01 (deterministic seeds, so the bound cannot flake). Triton draws 200 (its ids equal the reference's,
    tested above), the others 2000."""
    rows = 200 if backend == "triton" else 1000
    cond, uncond = torch.tensor([1.0, 0.0, -0.5, 2.0]), torch.tensor([0.5, 0.2, 0.0, 1.0])
    logits = torch.cat([cond.expand(rows, 4), uncond.expand(rows, 4)]).contiguous().to(device)
    expected = torch.softmax((uncond + 1.5 * (cond - uncond)) / 0.8, dim=0)
    steps = 1 if backend == "triton" else 2
    drawn = torch.cat([_sample(backend, logits, scales=(1.5,), temperature=0.8, seed=11,
                               offset=torch.tensor([step], device=device)) for step in range(steps)])  # fmt: skip
    freq = torch.bincount(drawn.cpu(), minlength=4).double() / drawn.numel()
    bound = 4 * (expected.double() * (1 - expected.double()) / drawn.numel()).sqrt() + 0.01
    assert ((freq - expected.double()).abs() <= bound).all(), f"frequencies {freq.tolist()}, p {expected.tolist()}"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_out_and_strided_logits(backend, device):
    wide = _logits(2, 3, 700, device=device, seed=8)
    logits = wide[:, :650]  # rows 700 apart
    kwargs = {"scales": (2.0,), "top_p": 0.95, "seed": 9, "offset": torch.tensor([1], device=device)}
    expected = _sample(backend, logits.contiguous(), **kwargs)
    out = torch.full((3,), -1, dtype=torch.int64, device=device)
    assert _sample(backend, logits, out=out, **kwargs) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    transposed = logits.t().contiguous().t()  # unit stride along rows: the op copies it
    torch.testing.assert_close(_sample(backend, transposed, **kwargs), expected, rtol=0, atol=0)


def test_rng_spec_is_an_accurate_exponential():
    """The reference RNG: log_f32 within 2^-23 (relative) of log, E = -log1p(-W) within 3 ulps of its fp64 value
    over the range that decides races (W < 1/2), E's mean and variance near 1."""
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(12)) * 20 + 2.0**-30
    rel = (ref.log_f32(x).double() - x.double().log()).abs() / x.double().log().abs().clamp_min(1e-30)
    assert rel.max() <= 2.0**-23
    bits = torch.randint(0, 2**31, (200_000,), generator=torch.Generator().manual_seed(13))
    w = (torch.clamp_max(bits.float() + 0.5, ref.W_MAX) * 2.0**-32).double()
    e = ref.exponential(bits).double()
    assert ((e - (-torch.log1p(-w))).abs() / e).max() <= 3 * 2.0**-24
    e_all = ref.exponential(torch.randint(0, 2**32, (200_000,), generator=torch.Generator().manual_seed(14)))
    assert abs(e_all.mean().item() - 1) < 0.01 and abs(e_all.var().item() - 1) < 0.03


BAD_INPUTS = [
    # (label, kwargs on top of 4 x 10 fp32 logits and scales (2.0,), exception, words the message must contain)
    ("integer logits", {"logits": torch.ones(4, 10, dtype=torch.long)}, TypeError, ["logits", "int64"]),
    ("1-D logits", {"logits": torch.randn(10)}, ValueError, ["logits", "2-D"]),
    ("rows not divisible", {"logits": torch.randn(5, 10)}, ValueError, ["logits", "G = len(scales) + 1 = 2"]),
    ("empty vocabulary", {"logits": torch.randn(4, 0)}, ValueError, ["logits", "V >= 1"]),
    ("three scales", {"scales": (1.0, 2.0, 3.0)}, ValueError, ["scales", "(1.0, 2.0, 3.0)"]),
    ("NaN scale", {"scales": (float("nan"),)}, ValueError, ["scales", "finite"]),
    ("scales a number", {"scales": 2.0}, ValueError, ["scales", "2.0"]),
    ("negative temperature", {"temperature": -0.5}, ValueError, ["temperature", "-0.5"]),
    ("infinite temperature", {"temperature": float("inf")}, ValueError, ["temperature", "inf"]),
    ("negative top_k", {"top_k": -1}, ValueError, ["top_k", "-1"]),
    ("float top_k", {"top_k": 2.5}, ValueError, ["top_k", "2.5"]),
    ("top_p zero", {"top_p": 0.0}, ValueError, ["top_p", "(0, 1]", "0.0"]),
    ("top_p above one", {"top_p": 1.5}, ValueError, ["top_p", "1.5"]),
    ("allowed empty", {"allowed": (5, 5)}, ValueError, ["allowed", "V = 10", "(5, 5)"]),
    ("allowed past V", {"allowed": (0, 11)}, ValueError, ["allowed", "(0, 11)"]),
    ("unknown mix", {"mix": "probs"}, ValueError, ["mix", "'probs'"]),
    ("seed too large", {"seed": 2**32}, ValueError, ["seed", str(2**32)]),
    ("negative seed", {"seed": -1}, ValueError, ["seed", "-1"]),
    ("offset int32", {"offset": torch.zeros(1, dtype=torch.int32)}, TypeError, ["offset", "int32"]),
    ("offset shape", {"offset": torch.zeros(2, dtype=torch.int64)}, ValueError, ["offset", "(1,)", "(2,)"]),
    ("offset not a tensor", {"offset": 3}, TypeError, ["offset", "int"]),
    ("out float", {"out": torch.zeros(2)}, TypeError, ["out", "float32"]),
    ("out shape", {"out": torch.zeros(4, dtype=torch.int64)}, ValueError, ["out", "(2,)", "(4,)"]),
    ("out strided", {"out": torch.zeros(4, dtype=torch.int64)[::2]}, ValueError, ["out", "contiguous"]),
    ("offset on meta", {"offset": torch.zeros(1, dtype=torch.int64, device="meta")}, ValueError,
     ["offset", "meta", "logits"]),
]  # fmt: skip


@pytest.mark.parametrize("label,kwargs,exc,words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_names_the_argument(label, kwargs, exc, words):
    call = {"logits": torch.randn(4, 10), "scales": (2.0,), **kwargs}
    with pytest.raises(exc) as info:
        fastmm.ops.cfg_sample(**call)
    for word in words:
        assert word in str(info.value), f"{label}: message {str(info.value)!r} lacks {word!r}"


def test_opcheck_and_compiled_decode_step():
    """The op passes opcheck, and a decode-style step compiled with fullgraph=True (offset read on the device,
    incremented in place between calls, ids written into a static buffer) draws what eager calls draw."""
    logits = _logits(2, 3, 500, seed=10)
    step = torch.zeros(1, dtype=torch.int64)
    torch.library.opcheck(
        torch.ops.fastmm.cfg_sample.default, (logits, [4.0], 1.0, 0, 0.9, 10, 400, False, 5, step)
    )

    def decode_step(logits, step, ids):
        fastmm.ops.cfg_sample(logits, (4.0,), top_p=0.9, allowed=(10, 400), seed=5, offset=step, out=ids)
        step += 1
        return ids

    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    ids = torch.empty(3, dtype=torch.int64)
    for expected_step in range(3):
        eager = fastmm.ops.cfg_sample(logits, (4.0,), top_p=0.9, allowed=(10, 400), seed=5, offset=step.clone())
        torch.testing.assert_close(compiled(logits, step, ids), eager, rtol=0, atol=0)
        assert step.item() == expected_step + 1
