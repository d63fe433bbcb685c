"""Generation loops of the unified model: image tokens (the Janus recipe) and text.

Image generation runs the conditional and unconditional rows of classifier-free guidance as one batch. After
the prompt, every token is one *decode step*, a function of static buffers only:

    embeds [R, 1, hidden] -> decoder (KV cache written at cache.lengths) -> generation head -> cfg_sample
    (seed, step counter on the device) -> ids [N] -> tokens[:, step] = ids -> embeds = generation_table[ids]

Nothing in it reads a tensor on the host, so on CUDA it is captured once as a CUDA graph and replayed per
token (fastmm.runtime.cuda_graph); on CPU it runs eagerly on the same buffers, and it compiles with
torch.compile(fullgraph=True).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import torch

from fastmm import ops
from fastmm.runtime.cuda_graph import capture_step
from fastmm.runtime.jacobi import Jacobi, jacobi_decode
from fastmm.runtime.window import default_window
from fastmm.kv_cache import KVCache

ProgressCallback = Callable[[int, int], None]  # (tokens done, total)


@dataclasses.dataclass
class GeneratedImages:
    tokens: torch.Tensor  # [num_images, num_image_tokens] int64 image tokens
    pixels: torch.Tensor | None  # [num_images, 3, S, S] decoded by the VQ tokenizer, about [-1, 1]; None if skipped
    time_to_first_token_s: float  # prompt prefill and the first sampled token
    capture_s: float  # CUDA-graph warm-up and capture (0 without a graph)
    decode_s: float  # every later token (num_image_tokens - 1 decode steps, or the Jacobi passes)
    vq_decode_s: float  # tokens -> pixels
    cuda_graph: bool  # whether the decode step ran as a replayed CUDA graph
    decoder_passes: int | None = None  # with parallel=Jacobi(...): decoder passes after the first token
    window: int | None = None  # with parallel=Jacobi(...): the window used (the resolved one for "auto")

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(self.tokens.shape[1] - 1, 1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt_rows(model, prompt_ids, num_images: int) -> torch.Tensor:
    """prompt_ids (a sequence of ints, [L] or [1, L]) -> [num_images, L] int64 on the model's device."""
    device = model.decoder.embed_tokens.weight.device
    ids = torch.as_tensor(prompt_ids, device=device)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"generate_image: prompt_ids must be one non-empty prompt [L] (or [1, L]), got shape {tuple(ids.shape)}")
    ids = ids.long()[None].repeat(num_images, 1)
    model.check_ids("prompt_ids", ids)
    return ids


def _unconditional(model, cond: torch.Tensor) -> torch.Tensor:
    """Janus's unconditional prompt: every token except BOS and BOI replaced by the pad token."""
    config = model.config
    for name in ("pad_token_id", "bos_token_id", "boi_token_id"):
        if getattr(config, name) is None:
            raise ValueError(f"generate_image: classifier-free guidance needs config.{name}, which is None")
    keep = (cond == config.bos_token_id) | (cond == config.boi_token_id)
    return torch.where(keep, cond, torch.full_like(cond, config.pad_token_id))


def guidance_groups(cfg_scale: float) -> int:
    """Decoder rows per image: a conditional and an unconditional one with guidance (cfg_scale != 1), else one."""
    return 2 if cfg_scale != 1 else 1


def _resolved_window(parallel: Jacobi, model, rows_per_slot: int) -> Jacobi:
    """``parallel`` with window="auto" replaced by the device's default window (fastmm.runtime.window) for a
    decoder pass of ``rows_per_slot`` rows per window slot."""
    if parallel.window != "auto":
        return parallel
    table = model.generation_table
    window = default_window(table.device, table.dtype, rows_per_slot, model.config.image_gen.num_image_tokens - 1)
    return dataclasses.replace(parallel, window=window)


def _check_sampling(cfg_scale: float, temperature: float, top_k: int | None, top_p: float | None, num_images: int,
                    seed: int | None) -> None:  # fmt: skip
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"generate_image: cfg_scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate_image: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate_image: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"generate_image: top_p must be None or in (0, 1], got {top_p!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"generate_image: num_images must be an int >= 1, got {num_images!r}")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise ValueError(f"generate_image: seed must be None or an int in [0, 2^32), got {seed!r}")


class ImageDecodeStep:
    """The static buffers of one image generation and the decode step over them (see the module docstring)."""

    def __init__(self, model, cache: KVCache, groups: int, scales: Sequence[float], temperature: float,
                 top_k: int | None, top_p: float | None, seed: int, num_images: int):  # fmt: skip
        device = cache.lengths.device
        config = model.config
        self.model, self.cache, self.groups = model, cache, groups
        self.sampling = dict(scales=tuple(scales), temperature=float(temperature), top_k=top_k, top_p=top_p, seed=seed)
        rows = groups * num_images
        self.embeds = torch.zeros(rows, 1, config.hidden_size, dtype=model.generation_table.dtype, device=device)
        image_modality = 1 if config.modality_adaptive else 0
        self.modality = torch.full((rows, 1), image_modality, dtype=torch.int64, device=device)
        self.ids = torch.zeros(num_images, dtype=torch.int64, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)  # tokens sampled so far; the RNG offset
        self.tokens = torch.zeros(num_images, config.image_gen.num_image_tokens, dtype=torch.int64, device=device)

    def sample(self, logits: torch.Tensor) -> None:
        """Sample the next token of every image from the head's logits [R, V] into the buffers."""
        ops.cfg_sample(logits, offset=self.step, out=self.ids, **self.sampling)
        self.tokens.index_copy_(1, self.step, self.ids[:, None])
        # Every group's row of an image takes the same token: gather each row once, broadcast over the groups.
        rows = self.model.image_embeds(self.ids)  # (N, hidden)
        self.embeds.view(self.groups, *rows.shape).copy_(rows.expand(self.groups, *rows.shape))
        self.step.add_(1)

    @torch.no_grad()
    def __call__(self) -> None:
        """One decode step: the last sampled tokens through the decoder, then the next sample. Under no_grad
        whoever calls it: with autograd on, the CPU step would leave the native decode layer for the Python
        layers and record a graph per token (about 4x slower at the 8 x 512 model)."""
        hidden = self.model.decoder(self.embeds, self.modality, self.cache, prefill=False)[:, -1]  # (R, hidden)
        self.sample(self.model.image_logits(hidden))


@torch.no_grad()
def start_image_generation(
    model,
    prompt_ids,
    cfg_scale: float = 5.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    cache_margin: int = 0,
) -> ImageDecodeStep:
    """Validate, run the prompt (conditional and unconditional rows) through the decoder into a fresh KV cache,
    sample the first token, and return the decode step that produces the others (arguments as
    generate_image; cache_margin: spare cache positions past the image, for windows that overshoot it). Each call
    of the returned step adds one token to its ``tokens`` buffer."""
    if model.config.image_gen is None:
        raise ValueError("generate_image: the model has no image-generation path (config.image_gen is None)")
    _check_sampling(cfg_scale, temperature, top_k, top_p, num_images, seed)
    cond = _prompt_rows(model, prompt_ids, num_images)
    guided = guidance_groups(cfg_scale) == 2
    rows = torch.cat([cond, _unconditional(model, cond)]) if guided else cond
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    cache = model.decoder.new_cache(rows.shape[0], cond.shape[1] + model.config.image_gen.num_image_tokens + cache_margin)
    step = ImageDecodeStep(model, cache, 2 if guided else 1, (float(cfg_scale),) if guided else (),
                           temperature, top_k, top_p, seed, num_images)  # fmt: skip
    hidden = model.decoder(model.embed_prompt(rows), torch.zeros_like(rows), cache, prefill=True)[:, -1]
    step.sample(model.image_logits(hidden))
    return step


@torch.no_grad()
def generate_image(
    model,
    prompt_ids,
    cfg_scale: float = 5.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    use_cuda_graph: bool = True,
    decode_pixels: bool = True,
    progress: ProgressCallback | None = None,
    parallel: Jacobi | None = None,
) -> GeneratedImages:
    """Generate ``num_images`` images for one prompt, Janus recipe.

    Args:
        model: a fastmm.models.UnifiedModel with an image-generation path.
        prompt_ids: the prompt's token ids (ending with the begin-of-image token), [L] or [1, L].
        cfg_scale: classifier-free guidance u + s (c - u) over a conditional and an unconditional row per image
            (the unconditional prompt keeps BOS and BOI, pads the rest). 1 = no guidance (one row per image);
            below 0 is an error.
        temperature: 0 = greedy (argmax of the guided logits).
        top_k, top_p: optional filters applied before sampling.
        seed: the sampling seed (None: drawn from torch's default generator); equal seeds give equal images.
        use_cuda_graph: on CUDA, capture the decode step once and replay it per token.
        decode_pixels: also run the VQ tokenizer's decoder.
        progress: called as progress(tokens done, total) after each token (with ``parallel``: at each check of
            the loop, with the least advanced image's count).
        parallel: Jacobi(window=W, init="random" | "copy") decodes by speculative Jacobi decoding: W draft tokens
            verified per decoder pass and image, lossless (the same tokens at temperature 0, the same
            distribution otherwise; fastmm.runtime.jacobi). window="auto" (the default) fills the decoder's
            rows up to the device's roofline crossover (fastmm.runtime.window). On CUDA with use_cuda_graph one
            iteration is captured and replayed, the host reading "all done?" every few passes.

    Returns:
        GeneratedImages with tokens [num_images, num_image_tokens], pixels and the timings.
    """
    if parallel is not None and not isinstance(parallel, Jacobi):
        raise ValueError(f"generate_image: parallel must be None or a fastmm.runtime.Jacobi, got {parallel!r}")
    if parallel is not None and model.config.image_gen is not None:  # start_image_generation refuses no image path
        _check_sampling(cfg_scale, temperature, top_k, top_p, num_images, seed)  # before num_images is used
        parallel = _resolved_window(parallel, model, guidance_groups(cfg_scale) * num_images)  # outside the timing
    start = time.perf_counter()
    margin = 0 if parallel is None else parallel.window
    step = start_image_generation(model, prompt_ids, cfg_scale, temperature, top_k, top_p, seed, num_images, margin)
    device, total = step.tokens.device, step.tokens.shape[1]
    _synchronize(device)
    first = time.perf_counter()
    if progress is not None:
        progress(1, total)
    if parallel is not None:
        passes, graphed = jacobi_decode(step, parallel, use_cuda_graph, progress)
        _synchronize(device)
        decoded = time.perf_counter()
        pixels = model.decode_image_tokens(step.tokens) if decode_pixels else None
        _synchronize(device)
        return GeneratedImages(tokens=step.tokens, pixels=pixels, time_to_first_token_s=first - start, capture_s=0.0,
                               decode_s=decoded - first, vq_decode_s=time.perf_counter() - decoded, cuda_graph=graphed,
                               decoder_passes=passes, window=parallel.window)  # fmt: skip

    graph = None
    if use_cuda_graph and device.type == "cuda":
        graph = capture_step(step, buffers=(step.cache.lengths, step.cache.positions, step.step, step.embeds, step.ids,
                                            step.tokens))  # fmt: skip
    _synchronize(device)
    captured = time.perf_counter()
    run = graph.replay if graph is not None else step
    for done in range(2, total + 1):
        run()
        if progress is not None:
            progress(done, total)
    _synchronize(device)
    decoded = time.perf_counter()

    pixels = model.decode_image_tokens(step.tokens) if decode_pixels else None
    _synchronize(device)
    return GeneratedImages(
        tokens=step.tokens,
        pixels=pixels,
        time_to_first_token_s=first - start,
        capture_s=captured - first,
        decode_s=decoded - captured,
        vq_decode_s=time.perf_counter() - decoded,
        cuda_graph=graph is not None,
    )


class _AllFinished:
    """generate_text's stop test, "has every row produced EOS?", read without draining the GPU's queue.

    On CPU poll() reads this step's flag. On CUDA it copies this step's flag into pinned host memory without a
    sync and returns the previous step's, waiting only until the GPU has finished that step's sampling (the
    decoder pass and the sampling queued since keep it busy): the loop learns one step late and drops that
    step's tokens, so the result is the same."""

    def __init__(self, device: torch.device):
        self.late = device.type == "cuda"
        if self.late:
            self.stream = torch.cuda.current_stream(device)
            self.flag = torch.zeros(1, dtype=torch.bool, pin_memory=True)
            self.copied = torch.cuda.Event()

    def poll(self, finished: torch.Tensor) -> bool:
        if not self.late:
            return bool(finished.all())
        self.copied.synchronize()  # the previous poll's copy; returns at once before the first record
        before = bool(self.flag)
        self.flag.copy_(finished.all(), non_blocking=True)
        self.copied.record(self.stream)
        return before


def _text_prompts(model, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] with each row's tokens first and padding after, lengths [B]) on the model's device, from ids
    [B, L] with an optional attention mask (any padding: left, right, or holes) or a list of prompts."""
    op = "generate_text"
    device = model.decoder.embed_tokens.weight.device
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError(f"{op}: attention_mask applies to an [B, L] input_ids tensor, not to a list of prompts")
        prompts = [torch.as_tensor(prompt, device=device).reshape(-1) for prompt in input_ids]
        if not prompts or any(p.numel() == 0 for p in prompts):
            raise ValueError(f"{op}: input_ids as a list must hold at least one non-empty prompt")
        if any(p.dtype.is_floating_point or p.dtype == torch.bool for p in prompts):
            raise TypeError(f"{op}: prompts must hold integer token ids")
        ids = torch.nn.utils.rnn.pad_sequence([p.long() for p in prompts], batch_first=True)
        lengths = torch.tensor([p.numel() for p in prompts], device=device)
    else:
        model.check_ids("input_ids", input_ids)
        ids = input_ids.to(device).long()
        if attention_mask is None:
            lengths = torch.full((ids.shape[0],), ids.shape[1], device=device)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
                raise ValueError(f"{op}: attention_mask must be a tensor of input_ids' shape {tuple(ids.shape)}, got {got}")
            valid = attention_mask.to(device) != 0
            lengths = valid.sum(dim=1)
            if int(lengths.min()) < 1:
                raise ValueError(f"{op}: every row of attention_mask must keep at least one token")
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # each row's tokens first, in order
            ids = ids.gather(1, order)
    padding = torch.arange(ids.shape[1], device=device)[None, :] >= lengths[:, None]
    # Padding takes a token that is not an image placeholder (it is never attended and never scored).
    filler = 1 if model.config.image_token_id == 0 else 0
    ids = ids.masked_fill(padding, filler)
    model.check_ids("input_ids", ids)
    return ids, lengths


@torch.no_grad()
def generate_text(
    model,
    input_ids,
    images: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    prune=None,
) -> torch.Tensor:
    """Answer prompts (image understanding) -> new tokens [B, n], n <= max_new_tokens.

    Args:
        input_ids: [B, L] token ids, with ``attention_mask`` [B, L] (0 = padding, left or right) when the
            prompts differ in length; or a list of B prompts (sequences of ids) of any lengths. image_token_id
            placeholders are filled by ``images`` [N, 3, S, S], in row-major order.
        temperature: 0 = greedy; top_k, top_p, seed: as generate_image.
        prune: a visual-token pruning policy of fastmm.runtime.prune (VTW, FastV, PyramidDrop): image tokens
            leave the prefill at its layers, and decoding attends each layer's shorter cache.

    Generation stops once every row has produced config.eos_token_id; a row that finished earlier is filled with
    the pad token (or EOS when the model has none) after its EOS. Each row decodes at its own length and RoPE
    position. The loop runs eagerly (the graph-captured loop is generate_image's) and its stop test never drains
    the GPU's queue: on CUDA the host reads each step's flag one step late (see _AllFinished), with the same
    result.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_text: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_sampling(1.0, temperature, top_k, top_p, 1, seed)
    config = model.config
    ids, lengths = _text_prompts(model, input_ids, attention_mask)
    embeds = model.embed_prompt(ids, images)
    B, L = ids.shape
    device = embeds.device
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
    cache = model.decoder.new_cache(B, L + max_new_tokens)
    image_mask = None if images is None else ids == config.image_token_id
    modality = model.prompt_modality(ids, images is not None)
    hidden = model.decoder.prefill(embeds, modality, cache, lengths, image_mask, prune).last
    text = torch.zeros(B, 1, dtype=torch.int64, device=device)  # every generated token is text
    eos = config.eos_token_id
    fill = config.pad_token_id if config.pad_token_id is not None else eos
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    step = torch.zeros(1, dtype=torch.int64, device=device)
    stop = _AllFinished(device) if eos is not None else None
    new_tokens = []
    for _ in range(max_new_tokens):
        ids = ops.cfg_sample(model.text_logits(hidden), temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, offset=step)  # fmt: skip
        step.add_(1)
        if eos is not None:
            ids = torch.where(finished, torch.full_like(ids, fill), ids)
            finished |= ids == eos
        new_tokens.append(ids)
        if stop is not None and stop.poll(finished):
            if stop.late:
                new_tokens.pop()  # sampled after every row had finished: the stop came one step late
            break
        embed = model.decoder.embed_tokens(ids)[:, None]  # (B, 1, hidden)
        hidden = model.decoder(embed, text, cache, prefill=False)[:, -1]
    return torch.stack(new_tokens, dim=1)
