"""Speculative Jacobi decoding of image tokens (fastmm.runtime.jacobi, fastmm.ops.jacobi_verify).

Greedy: the tokens equal sequential greedy decoding for every window, both initializations, CFG on and off.
Sampling: on a tiny model with 4 image codes and 3 tokens, the sequences SJD draws over 4000 images match the
exact sequential distribution (enumerated from the decoder's own conditionals, guidance and temperature written
out here) by a chi-square test at significance 1e-3; the same test rejects a deliberately wrong rule (accept
whenever p(d) > 0). The verify op against a plain Python loop over the slots; per-image progress; bad input."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import fastmm
from fastmm.models import UnifiedModel, presets
from fastmm.reference import sampling as ref
from fastmm.runtime import Jacobi, generate_image
from fastmm.runtime import jacobi as jacobi_module
from fastmm.runtime import window as window_module

PROMPT = [presets.BOS, 10, 11, 12, 13, 14, presets.BOI]


def tiny_model(tokens: int, codes: int | None = None):
    config = presets.demo_config("tiny")
    gen = dataclasses.replace(config.image_gen, num_image_tokens=tokens, codebook_size=codes or config.image_gen.codebook_size)
    config = dataclasses.replace(config, vq=None if codes else config.vq, image_gen=gen)
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    model.refresh_generation_table()
    return model


@pytest.fixture(scope="module")
def model40():
    return tiny_model(40)


# -------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("cfg_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("window", [1, 2, 5, 16])
@pytest.mark.parametrize("init", ["random", "copy"])
def test_greedy_tokens_equal_sequential_greedy(model40, cfg_scale, window, init):
    sequential = generate_image(model40, PROMPT, cfg_scale=cfg_scale, temperature=0.0, num_images=2, decode_pixels=False)
    jacobi = generate_image(model40, PROMPT, cfg_scale=cfg_scale, temperature=0.0, num_images=2, decode_pixels=False,
                            parallel=Jacobi(window, init))  # fmt: skip
    assert torch.equal(jacobi.tokens, sequential.tokens)
    assert jacobi.decoder_passes <= 39  # never more passes than sequential decoding's steps


# ------------------------------------------------------------------------------------------------ sampling

TEMPERATURE, CFG = 0.5, 3.0


def exact_distribution(model, tokens: int, codes: int) -> dict[tuple[int, ...], float]:
    """P(sequence) under sequential sampling: the product of the decoder's conditionals, each guided
    (u + s (c - u)) and tempered here, every prefix run from scratch through a prefill."""
    cond = torch.tensor([PROMPT])
    uncond = torch.where((cond == presets.BOS) | (cond == presets.BOI), cond, torch.full_like(cond, presets.PAD))
    conditionals = {}
    for length in range(tokens):
        prefixes = list(itertools.product(range(codes), repeat=length))
        for prefix in prefixes:
            rows = []
            for prompt in (cond, uncond):
                embeds = model.embed_prompt(prompt)
                if prefix:
                    embeds = torch.cat([embeds, model.image_embeds(torch.tensor(prefix))[None]], dim=1)
                rows.append(embeds)
            embeds = torch.cat(rows)
            cache = model.decoder.new_cache(2, embeds.shape[1])
            with torch.no_grad():
                hidden = model.decoder(embeds, torch.zeros(2, embeds.shape[1], dtype=torch.int64), cache, prefill=True)
                c, u = model.image_logits(hidden[:, -1]).double()
            conditionals[prefix] = torch.softmax((u + CFG * (c - u)) / TEMPERATURE, dim=0)
    out = {}
    for sequence in itertools.product(range(codes), repeat=tokens):
        out[sequence] = math.prod(float(conditionals[sequence[:i]][sequence[i]]) for i in range(tokens))
    return out


def chi_square_p_value(counts: dict, expected: dict, total: int) -> float:
    """Pearson's test of counts against the exact probabilities, cells with expected count < 5 pooled."""
    statistic, pooled_count, pooled_expected, cells = 0.0, 0, 0.0, 0
    for key, probability in expected.items():
        e = probability * total
        if e < 5:
            pooled_count, pooled_expected = pooled_count + counts.get(key, 0), pooled_expected + e
            continue
        statistic += (counts.get(key, 0) - e) ** 2 / e
        cells += 1
    if pooled_expected > 0:
        statistic += (pooled_count - pooled_expected) ** 2 / pooled_expected
        cells += 1
    dof = cells - 1  # the chi-square survival function is the regularized upper incomplete gamma Q(dof / 2, x / 2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2)))


def _sample_sequences(model, window: int, images: int, seeds: range) -> dict:
    counts: dict = {}
    for seed in seeds:
        out = generate_image(model, PROMPT, cfg_scale=CFG, temperature=TEMPERATURE, num_images=images, seed=seed,
                             decode_pixels=False, parallel=Jacobi(window))  # fmt: skip
        for row in out.tokens.tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


@pytest.fixture(scope="module")
def small_vocab():
    model = tiny_model(3, codes=4)
    return model, exact_distribution(model, 3, 4)


def test_sampling_preserves_the_sequential_distribution(small_vocab):
    """Significance 1e-3: a correct implementation fails for at most 1 in 1000 choices of the seeds (these seeds
    are fixed, so the outcome is deterministic)."""
    model, expected = small_vocab
    counts = _sample_sequences(model, 2, 1000, range(1, 5))
    assert chi_square_p_value(counts, expected, 4000) > 1e-3
    sequential: dict = {}  # the enumerated distribution is sequential sampling's (the oracle checked too)
    for seed in range(1, 5):
        out = generate_image(model, PROMPT, cfg_scale=CFG, temperature=TEMPERATURE, num_images=1000, seed=seed,
                             decode_pixels=False)  # fmt: skip
        for row in out.tokens.tolist():
            sequential[tuple(row)] = sequential.get(tuple(row), 0) + 1
    assert chi_square_p_value(sequential, expected, 4000) > 1e-3


def test_a_wrong_acceptance_rule_fails_the_distribution_test(small_vocab, monkeypatch):
    model, expected = small_vocab
    monkeypatch.setattr(ref, "accepts", lambda u, p, q: p > 0)
    with fastmm.use_backend("reference"):  # the rule patched is the reference kernel's
        counts = _sample_sequences(model, 2, 1000, range(1, 5))
    assert chi_square_p_value(counts, expected, 4000) < 1e-3


def test_images_advance_at_their_own_pace(model40, monkeypatch):
    """At temperature 1 the images of one batch accept different counts per pass, and each keeps its own
    frontier: every image ends with all its tokens and the passes end when the slowest is done."""
    counts = []
    verify = fastmm.ops.jacobi_verify

    def recording(*args, **kwargs):
        out = verify(*args, **kwargs)
        counts.append(out[0].clone())
        return out

    monkeypatch.setattr(fastmm.ops, "jacobi_verify", recording)
    out = generate_image(model40, PROMPT, cfg_scale=2.0, temperature=1.0, num_images=2, seed=3, decode_pixels=False,
                         parallel=Jacobi(6, "copy"))  # fmt: skip
    per_image = torch.stack(counts)  # [passes, 2]
    assert (per_image[:, 0] != per_image[:, 1]).any()
    assert per_image.sum(dim=0).tolist() == [39, 39]  # each image got exactly its 39 tokens after the first
    done_at = [int(torch.nonzero(per_image[:, b].cumsum(0) == 39)[0]) for b in range(2)]
    assert out.decoder_passes == max(done_at) + 1 == len(counts)
    assert ((out.tokens >= 0) & (out.tokens < model40.config.image_gen.codebook_size)).all()


def test_passes_after_the_last_image_change_nothing(model40, monkeypatch):
    """The loop reads "all done?" only every few passes on CUDA: passes run after an image (or all) finished
    leave tokens, pass count and cache as they were. Checked on the CPU by reading every 3 passes."""
    def run():
        return generate_image(model40, PROMPT, cfg_scale=2.0, temperature=1.0, num_images=2, seed=3,
                              decode_pixels=False, parallel=Jacobi(6, "copy"))  # fmt: skip

    expected = run()
    monkeypatch.setitem(jacobi_module.CHECK_EVERY, "cpu", 3)
    got = run()
    assert torch.equal(got.tokens, expected.tokens) and got.decoder_passes == expected.decoder_passes


def test_progress_on_the_parallel_path(model40):
    calls = []
    generate_image(model40, PROMPT, temperature=0.0, decode_pixels=False, parallel=Jacobi(4, "copy"),
                   progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    done = [d for d, _ in calls]
    assert calls[0] == (1, 40) and calls[-1] == (40, 40) and done == sorted(done) and len(calls) > 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_iteration_equals_eager():
    """On CUDA the iteration is captured once and replayed: the same tokens and passes as eager passes."""
    model = tiny_model(40).cuda()
    model.refresh_generation_table()
    kwargs = dict(cfg_scale=2.0, temperature=1.0, num_images=2, seed=3, decode_pixels=False,
                  parallel=Jacobi(6, "copy"))  # fmt: skip
    eager = generate_image(model, PROMPT, use_cuda_graph=False, **kwargs)
    graphed = generate_image(model, PROMPT, use_cuda_graph=True, **kwargs)
    assert graphed.cuda_graph and not eager.cuda_graph
    assert torch.equal(graphed.tokens, eager.tokens) and graphed.decoder_passes == eager.decoder_passes


# -------------------------------------------------------------------------------------------------- the op


def _loop_verify(logits, drafts, q, start, limit, scale, temperature, seed):
    """One image (N = 1, G = 2), the rule slot by slot in Python: guided, tempered p; accept iff
    u < min(1, p(d) / q(d)); the first rejection takes the race winner of the residual max(0, p - q) with the
    correction stream's noise. Returns (count, the new tokens)."""
    c, u_ = logits[0].double(), logits[1].double()
    new = []
    for t in range(drafts.shape[1]):
        position = int(start[0]) + t
        if position >= limit:
            break
        p = torch.softmax((u_[t] + scale * (c[t] - u_[t])) / temperature, dim=0)
        u = (float(ref.stream_bits(seed, torch.tensor([[position]]), 1, None)[0, 0]) + 0.5) * 2.0**-32
        d = int(drafts[0, t])
        if u < min(1.0, float(p[d]) / float(q[0, t, d])):
            new.append(d)
            continue
        residual = (p - q[0, t].double()).clamp(min=0).float()
        new.append(int(ref.race(residual.log()[None, None], seed, torch.tensor([[position]]), 2)[0, 0]))
        break
    return new


def test_verify_counts_equal_a_slot_by_slot_loop():
    gen = torch.Generator().manual_seed(0)
    N, W, V = 1, 6, 5
    logits = torch.randn(2 * N, W, V, generator=gen)
    drafts = torch.randint(0, V, (N, W), generator=gen)
    q = torch.softmax(torch.randn(N, W, V, generator=gen), dim=-1)
    start = torch.tensor([10])
    for limit in (12, 40):
        for seed in range(20):
            count, tokens, probs = fastmm.ops.jacobi_verify(logits, drafts, q, start, limit, scales=(3.0,),
                                                            temperature=0.7, seed=seed)  # fmt: skip
            expected = _loop_verify(logits, drafts, q, start, limit, 3.0, 0.7, seed)
            n = int(count[0])
            assert n == len(expected) and tokens[0, :n].tolist() == expected
            assert (probs[0, :n] == 0).all() and torch.allclose(probs[0, n:].sum(-1), torch.ones(W - n))


def test_greedy_verify_accepts_the_argmax_run():
    logits = torch.full((1, 4, 6), -5.0)
    argmax = [2, 4, 1, 3]
    for t, best in enumerate(argmax):
        logits[0, t, best] = 5.0
    drafts = torch.tensor([[2, 4, 0, 3]])
    q = torch.full((1, 4, 6), 1 / 6)
    count, tokens, _ = fastmm.ops.jacobi_verify(logits, drafts, q, torch.tensor([0]), 100, temperature=0.0)
    assert count.tolist() == [3] and tokens[0, :3].tolist() == [2, 4, 1] and tokens[0, 3].tolist() == 3


# ------------------------------------------------------------------------------------------------ default window


@pytest.mark.parametrize(
    "crossover, rows_per_slot, tokens_left, expected",
    [(40.0, 2, 100, 16), (9.0, 2, 100, 4), (9.9, 1, 100, 9), (3.0, 2, 100, 2), (0.5, 4, 100, 2), (40.0, 1, 5, 5),
     (40.0, 1, 1, 1)],
)
def test_default_window_fills_rows_to_the_crossover(monkeypatch, crossover, rows_per_slot, tokens_left, expected):
    """W = crossover rows // rows per slot, within [MIN_WINDOW, MAX_WINDOW] and the tokens left."""
    monkeypatch.setattr(window_module, "crossover_rows", lambda device, dtype: crossover)
    assert window_module.default_window(torch.device("cpu"), torch.float32, rows_per_slot, tokens_left) == expected


def test_crossover_rows_measures_the_linear_kernel(monkeypatch):
    """rows* = R t(1) / t(R): a kernel whose time grows with the rows only past 4 rows crosses over at 4."""
    monkeypatch.setattr(window_module, "_median_seconds", lambda fn, device: fn())
    monkeypatch.setattr(window_module.ops, "linear", lambda x, weight: max(4, x.shape[0]) * 1e-3)
    window_module.crossover_rows.cache_clear()
    try:
        assert window_module.crossover_rows(torch.device("cpu"), torch.float32) == pytest.approx(4.0)
    finally:
        window_module.crossover_rows.cache_clear()


@pytest.mark.parametrize("cfg_scale, num_images, expected", [(5.0, 1, 4), (1.0, 1, 9), (5.0, 2, 2)])
def test_auto_window_is_reported_and_lossless(model40, monkeypatch, cfg_scale, num_images, expected):
    """The default window: with a crossover of 9 rows, 9 // (CFG groups x images) slots; the result names it,
    and greedy tokens still equal sequential greedy."""
    monkeypatch.setattr(window_module, "crossover_rows", lambda device, dtype: 9.0)
    kwargs = dict(cfg_scale=cfg_scale, num_images=num_images, temperature=0.0, decode_pixels=False)
    sequential = generate_image(model40, PROMPT, **kwargs)
    result = generate_image(model40, PROMPT, parallel=Jacobi(init="copy"), **kwargs)
    assert result.window == expected
    assert torch.equal(result.tokens, sequential.tokens)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input(model40):
    with pytest.raises(ValueError, match="Jacobi: window must be an int >= 1 or 'auto', got 0"):
        Jacobi(0)
    with pytest.raises(ValueError, match="Jacobi: window must be an int >= 1 or 'auto', got 'big'"):
        Jacobi("big")
    with pytest.raises(ValueError, match="Jacobi: init must be one of"):
        Jacobi(4, "zeros")
    with pytest.raises(ValueError, match=r"the Jacobi window \(40\) is larger than the tokens left after the first \(39\)"):
        generate_image(model40, PROMPT, temperature=0.0, decode_pixels=False, parallel=Jacobi(40))
    with pytest.raises(ValueError, match="parallel must be None or a fastmm.runtime.Jacobi"):
        generate_image(model40, PROMPT, decode_pixels=False, parallel=4)
    no_image = UnifiedModel(dataclasses.replace(presets.demo_config("tiny"), image_gen=None, vq=None)).eval()
    with pytest.raises(ValueError, match="no image-generation path"):
        generate_image(no_image, PROMPT, parallel=Jacobi(4))
    logits, drafts = torch.zeros(2, 3, 5), torch.zeros(1, 3, dtype=torch.int64)
    q, start = torch.full((1, 3, 5), 0.2), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"drafts - lo must be"):
        fastmm.ops.jacobi_verify(logits, drafts + 5, q, start, 10, scales=(2.0,))
    with pytest.raises(ValueError, match=r"logits must be \[G\*N, W, V\] = \[2, 3, V\]"):
        fastmm.ops.jacobi_verify(logits[:1], drafts, q, start, 10, scales=(2.0,))
    with pytest.raises(TypeError, match="draft_probs must be float32"):
        fastmm.ops.jacobi_verify(logits, drafts, q.double(), start, 10, scales=(2.0,))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_opcheck(temperature):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=gen)
    drafts = torch.randint(0, 5, (1, 3), generator=gen)
    q = torch.softmax(torch.randn(1, 3, 5, generator=gen), dim=-1)
    args = (logits, drafts, q, torch.tensor([4]), 6, [2.0], temperature, 0, 1.0, 0, 5, False, 7)
    torch.library.opcheck(torch.ops.fastmm.jacobi_verify.default, args)


def test_native_verify_equals_the_reference():
    """fastmm.native's kernel against the reference: the same counts and tokens, probs within 1e-6, over dtypes,
    guidance on and off, temperatures with top-k / top-p, windows 1..8, a sub-range of allowed ids and limits that
    cut the window. Drafts come from p itself (long accepted runs) or, in about a third of the slots, from a random
    q (rejections and corrections)."""
    pytest.importorskip("fastmm._C")
    seen = set()
    for case, (dtype, scales, (temperature, top_k, top_p)) in enumerate(itertools.product(
            (torch.float32, torch.bfloat16), ((), (3.0,)),
            ((0.0, None, None), (0.7, None, None), (0.7, 5, None), (1.3, None, 0.8), (1.3, 7, 0.9)))):  # fmt: skip
        for W in range(1, 9):
            g = torch.Generator().manual_seed(100 * case + W)
            N, V, G = 1 + (case + W) % 3, 38 + W % 5, len(scales) + 1
            allowed = (3, V - 5) if W % 4 == 0 else None
            lo, hi = allowed or (0, V)
            n = hi - lo
            logits = (2 * torch.randn(G * N, W, V, generator=g)).to(dtype)
            p = ref.processed_probs(logits.reshape(G * N * W, V), scales, temperature, top_k or 0, top_p or 1.0, lo,
                                    hi, False).view(N, W, n)  # fmt: skip
            drafts = torch.multinomial(p.view(-1, n), 1, generator=g).view(N, W)
            random = torch.rand(N, W, generator=g) < 0.35
            q = torch.where(random[..., None], torch.softmax(torch.randn(N, W, n, generator=g), dim=-1), p)
            drafts = torch.where(random, torch.randint(0, n, (N, W), generator=g), drafts) + lo
            start = torch.randint(0, 30, (N,), generator=g)
            limit = int(start.min()) + W // 2 if W % 3 == 1 else 1000  # cuts some images' windows
            options = dict(scales=scales, temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed,
                           seed=case * 8 + W)  # fmt: skip
            results = []
            for backend in ("native", "reference"):
                with fastmm.use_backend(backend):
                    results.append(fastmm.ops.jacobi_verify(logits, drafts, q, start, limit, **options))
            (count, tokens, probs), (ref_count, ref_tokens, ref_probs) = results
            where = f"{dtype} scales {scales} temperature {temperature} top_k {top_k} top_p {top_p} W {W}"
            assert torch.equal(count, ref_count), where
            assert torch.equal(tokens, ref_tokens), where
            torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0, msg=where)
            seen.update(int(c) for c in count)
    assert {0, 1, 8} <= seen and len(seen) >= 6  # rejections at the first slot, cuts and whole windows accepted



def test_triton_verify_equals_the_reference():
    """fastmm.triton's kernels (the interpreter without a GPU) against the reference: the same counts and tokens,
    probs within 1e-6, over fp32 and bf16 logits, guidance on and off, temperature 0, plain temperature, top-k and
    top-p, windows 1..5, images 1..2, a sub-range of allowed ids and limits that cut the window; drafts from p or,
    in about half of the slots, drawn from a random q (rejections and corrections). A short list of cases, not
    their product: the interpreter takes about a quarter of a second per row with top-k or top-p (32-pass
    threshold searches)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [  # dtype, scales, (temperature, top_k, top_p), mix, W, N, a sub-range of allowed ids
        (torch.float32, (), (0.0, None, None), "logits", 5, 2, False),
        (torch.bfloat16, (3.0,), (0.0, None, None), "log_softmax", 4, 2, True),
        (torch.float32, (3.0,), (0.0, None, None), "logits", 3, 2, False),
        (torch.float32, (), (0.7, 5, None), "logits", 1, 2, False),
        (torch.bfloat16, (3.0,), (0.7, 5, None), "logits", 2, 1, True),
        (torch.bfloat16, (), (1.3, None, 0.8), "logits", 2, 2, False),
        (torch.float32, (3.0,), (1.3, None, 0.8), "logits", 3, 1, True),
        (torch.float32, (), (0.9, None, None), "logits", 5, 2, False),  # no search: many rows at little cost
        (torch.bfloat16, (3.0,), (0.9, None, None), "log_softmax", 4, 2, True),
    ]
    seen = set()
    for case, (dtype, scales, (temperature, top_k, top_p), mix, W, N, sub_range) in enumerate(cases):
        g = torch.Generator().manual_seed(1000 + case)
        V, G = 38 + case % 5, len(scales) + 1
        allowed = (3, V - 5) if sub_range else None
        lo, hi = allowed or (0, V)
        n = hi - lo
        logits = (2 * torch.randn(G * N, W, V, generator=g)).to(dtype)
        p = ref.processed_probs(logits.reshape(G * N * W, V), scales, temperature, top_k or 0, top_p or 1.0, lo, hi,
                                mix == "log_softmax").view(N, W, n)  # fmt: skip
        random = torch.rand(N, W, generator=g) < 0.5
        q = torch.where(random[..., None], torch.softmax(3 * torch.randn(N, W, n, generator=g), dim=-1), p)
        drafts = torch.multinomial(q.view(-1, n), 1, generator=g).view(N, W) + lo
        start = torch.randint(0, 30, (N,), generator=g)
        limit = int(start.min()) + W // 2 if case % 2 == 1 else 1000  # cuts some images' windows
        options = dict(scales=scales, temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed, mix=mix,
                       seed=case * 8 + W)  # fmt: skip
        results = []
        for backend, where in (("triton", device), ("reference", "cpu")):
            with fastmm.use_backend(backend):
                args = [t.to(where) for t in (logits, drafts, q, start)]
                results.append([t.cpu() for t in fastmm.ops.jacobi_verify(*args, limit, **options)])
        (count, tokens, probs), (ref_count, ref_tokens, ref_probs) = results
        where = f"case {case}: {dtype} scales {scales} temperature {temperature} top_k {top_k} top_p {top_p} W {W}"
        assert torch.equal(count, ref_count), where
        assert torch.equal(tokens, ref_tokens), where
        torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0, msg=where)
        seen.update((int(c), W) for c in count)
    # rejections at slot 0, accepted runs ended by a rejection or a cut, and a whole window accepted
    assert (0, 1) in seen and (3, 3) in seen and any(0 < count < W for count, W in seen)


@pytest.mark.parametrize("groups,temperature,dtype", [(2, 0.0, torch.float32), (2, 0.9, torch.bfloat16),
                                                      (1, 1.3, torch.float32)])  # fmt: skip
def test_triton_split_verify_equals_the_reference(groups, temperature, dtype):
    """The split verification (chunks of whole 1024-id tiles per program: statistics, the pass over each chunk,
    a merge) against the reference: the same counts and tokens, probs within 1e-6. Allowed ranges that do not
    start or end on a tile, a last chunk shorter than the others, more splits asked for than tiles; greedy ties
    across chunks (the lowest id), a NaN logit and a window row whose chunk holds only -inf; drafts from p or, in
    half of the slots, from a random q (rejections, corrections)."""
    pytest.importorskip("triton")
    from fastmm.triton.sampling import jacobi_verify_in_chunks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, W, V = 2, 3, 3000
    scales = (3.0,) if groups == 2 else ()
    g = torch.Generator().manual_seed(groups * 10 + int(temperature * 10))
    logits = 2 * torch.randn(groups * N, W, V, generator=g)
    logits[:, 0, [40, 1100, 2500]] = 60.0  # a tie across chunks in slot 0 of every row, of every group
    logits[:, 1, 5] = float("nan")
    logits[:, 2, 1024:2048] = float("-inf")  # a chunk of -inf only
    logits = logits.to(dtype)
    for (lo, hi), splits in (((0, V), 3), ((100, 2901), 2), ((5, 1030), 64)):
        n = hi - lo
        p = ref.processed_probs(logits.reshape(-1, V), scales, temperature, 0, 1.0, lo, hi, False).view(N, W, n)
        random = torch.rand(N, W, generator=g) < 0.5
        q = torch.where(random[..., None], torch.softmax(3 * torch.randn(N, W, n, generator=g), dim=-1), p)
        drafts = torch.multinomial(q.view(-1, n), 1, generator=g).view(N, W) + lo
        start = torch.randint(0, 30, (N,), generator=g)
        limit = int(start.min()) + 2
        args = (scales, temperature, 0, 1.0, lo, hi, False, 11)
        got = jacobi_verify_in_chunks(*(t.to(device) for t in (logits, drafts, q, start)), limit, *args, splits)
        expected = ref.jacobi_verify_fwd(logits, drafts, q, start, limit, *args)
        where = f"allowed [{lo}, {hi}), splits {splits}"
        (count, tokens, probs), (ref_count, ref_tokens, ref_probs) = [t.cpu() for t in got], expected
        assert torch.equal(count, ref_count), where
        assert torch.equal(tokens, ref_tokens), where
        torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0, msg=where)


def test_triton_split_verify_refuses_whole_row_statistics():
    pytest.importorskip("triton")
    from fastmm.triton.sampling import jacobi_verify_in_chunks

    logits = torch.randn(2, 2, 3000)
    drafts, q, start = torch.zeros(1, 2, dtype=torch.int64), torch.full((1, 2, 3000), 1 / 3000), torch.zeros(1).long()
    for temperature, top_k, top_p, log_softmax in ((1.0, 0, 0.9, False), (1.0, 10, 1.0, False), (1.0, 0, 1.0, True)):
        with pytest.raises(ValueError, match="splits > 1 needs raw logits without top-k / top-p"):
            jacobi_verify_in_chunks(logits, drafts, q, start, 10, (5.0,), temperature, top_k, top_p, 0, 3000,
                                    log_softmax, 0, 2)  # fmt: skip
