"""fastmm.profile: where the time of one image generation (and optionally one text answer) goes.

The run, in order: the vision encoder on one image (when given), the image generation of the Janus recipe
(prefill of the prompt and the first token, CUDA-graph capture on CUDA, one decode step per further token,
VQ decode to pixels), then an understanding answer of ``text_tokens`` greedy tokens (when asked), whose
prompt carries the image. Warm-up runs come first and are not reported; the trace, when asked, records one
more run after the measured one, so the profiler's overhead never touches the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastmm.bench import environment
from fastmm.bench.roofline import cpu_model, gpu_peaks
from fastmm.models import UnifiedModel
from fastmm.profiling import inputs
from fastmm.profiling.memory import measure_peak
from fastmm.profiling.report import Generation, ProfileReport
from fastmm.profiling.stages import Clock, Latency, Mark, Stages, step_range
from fastmm.profiling.telemetry import Telemetry
from fastmm.profiling.trace import chrome_trace, fastmm_ranges
from fastmm.runtime import generate_text
from fastmm.runtime.cuda_graph import capture_step
from fastmm.runtime.generate import start_image_generation

Progress = Callable[[str, int, int], None]  # (what, done, total)
PROGRESS_UPDATES = 64  # progress calls per token loop at most: a call costs host time between decode steps


@dataclasses.dataclass(frozen=True)
class _Plan:
    prompt_ids: list[int]
    image: torch.Tensor | None  # [1, 3, S, S] for the vision encoder
    text_ids: torch.Tensor | None  # [1, L] understanding prompt, None: no text run
    text_tokens: int
    cfg_scale: float
    temperature: float
    seed: int
    num_images: int
    use_cuda_graph: bool


@dataclasses.dataclass(frozen=True)
class _Tokens:
    """When the tokens of one generation were ready: the start, the first token, then the decode steps (from
    the mark where they start, one mark per further token)."""

    start: Mark
    first: Mark
    steps: list[Mark]


@dataclasses.dataclass
class _Times:
    stages: Stages
    image: _Tokens
    text: _Tokens | None
    cuda_graph: bool


def profile(
    model: UnifiedModel | str | os.PathLike,
    prompt_ids: Sequence[int] | None = None,
    image: torch.Tensor | str | os.PathLike | None = None,
    *,
    text_tokens: int = 0,
    cfg_scale: float = 5.0,
    temperature: float = 1.0,
    seed: int = 0,
    num_images: int = 1,
    warmup: int = 1,
    use_cuda_graph: bool = True,
    trace: str | os.PathLike | None = None,
    trace_tokens: int | None = 64,
    png: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    telemetry_interval_s: float = 0.05,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> ProfileReport:
    """Profile one image generation of ``model`` (and optionally one text answer): stage times, per-token
    latency percentiles, peak memory, NVML telemetry; optionally a Chrome trace, a PNG and a JSON report.

    Args:
        model: a fastmm.models.UnifiedModel with an image-generation path, or a transformers Janus checkpoint
            directory (loaded with ``dtype`` on ``device``; default device: CUDA when torch sees one).
        prompt_ids: the image prompt's ids, ending with BOI; default BOS, four text ids, BOI.
        image: the vision encoder's input: [1, 3, S, S] in [-1, 1], an image file, "random" (uniform noise),
            or None (no vision stage; the text answer then has no image).
        text_tokens: greedy tokens of an understanding answer after the image generation (0: no text run).
        cfg_scale, temperature, seed, num_images, use_cuda_graph: as fastmm.runtime.generate_image.
        warmup: unreported runs before the measured one (first-call costs: allocation, Triton compilation).
        trace: write a torch.profiler Chrome trace of one more run here (fastmm ops as ``fastmm::<op>``,
            stages and decode steps as ``fastmm/<stage>``).
        trace_tokens: image tokens of the traced run (None: all); every step adds to the trace's size.
        png: write the plot of per-token latency and stage breakdown here.
        json_path: write the report as JSON here.
        telemetry_interval_s: NVML sampling period (CUDA runs with a driver only).
        name: how the report names the model (default: the checkpoint path, or "UnifiedModel").
        progress: called as progress(what, done, total) during the runs.

    Returns:
        The ProfileReport (fastmm.profiling.report), also written to ``json_path``.
    """
    if isinstance(model, (str, os.PathLike)):
        name = name or str(model)
        target = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = UnifiedModel.from_pretrained(model, dtype=dtype, device=target)
    elif not isinstance(model, UnifiedModel):
        raise TypeError(f"profile: model must be a UnifiedModel or a checkpoint directory, got {type(model).__name__}")
    if model.config.image_gen is None:
        raise ValueError("profile: model has no image-generation path (config.image_gen is None)")
    counts = [("text_tokens", text_tokens, 0), ("warmup", warmup, 0), ("num_images", num_images, 1)]
    counts += [("trace_tokens", trace_tokens, 1)] if trace_tokens is not None else []
    for argument, value, low in counts:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"profile: {argument} must be an int >= {low}, got {value!r}")
    if not (isinstance(telemetry_interval_s, (int, float)) and telemetry_interval_s > 0):
        raise ValueError(f"profile: telemetry_interval_s must be a number > 0, got {telemetry_interval_s!r}")
    plan = _plan(model, prompt_ids, image, text_tokens, cfg_scale, temperature, seed, num_images, use_cuda_graph)
    device = model.decoder.embed_tokens.weight.device
    report_progress = progress or (lambda what, done, total: None)

    telemetry = Telemetry(device, telemetry_interval_s)

    def runs() -> _Times:
        for index in range(warmup):
            _run(model, plan, None, report_progress, f"warm-up {index + 1}/{warmup}", None)
        return _run(model, plan, telemetry, report_progress, "measured run", None)

    times, memory = measure_peak(runs, device)
    report = _report(model, plan, times, memory, telemetry, name or "UnifiedModel", warmup)
    if trace is not None:
        with chrome_trace(Path(trace), device):
            _run(model, plan, None, report_progress, "traced run", trace_tokens)
        report.trace, report.trace_ranges = str(trace), fastmm_ranges(Path(trace))
    if png is not None:
        from fastmm.profiling.plot import plot

        report.png = str(plot(report, png))
    if json_path is not None:
        report.write_json(json_path)
    return report


def _plan(model, prompt_ids, image, text_tokens, cfg_scale, temperature, seed, num_images, use_cuda_graph) -> _Plan:
    """Validate the inputs that are not generate_image's to check, and build them."""
    if isinstance(image, str) and image == "random":
        image = inputs.random_image(model, seed)
    elif isinstance(image, (str, os.PathLike)):
        image = inputs.load_image(model, image)
    elif image is not None:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"profile: image must be a tensor, an image file, 'random' or None, got {type(image).__name__}")
        vision = inputs.vision_config(model, "image")
        expected = (1, vision.num_channels, vision.image_size, vision.image_size)
        if tuple(image.shape) != expected:
            raise ValueError(f"profile: image must be a tensor of shape {expected}, got {tuple(image.shape)}")
        image = image.to(model.decoder.embed_tokens.weight.device)
    if text_tokens and image is not None and model.config.image_token_id is None:
        raise ValueError("profile: a text run with an image needs config.image_token_id, which is None")
    return _Plan(
        prompt_ids=list(prompt_ids) if prompt_ids is not None else inputs.image_prompt(model),
        image=image,
        text_ids=inputs.text_prompt(model, image is not None) if text_tokens else None,
        text_tokens=text_tokens,
        cfg_scale=cfg_scale,
        temperature=temperature,
        seed=seed,
        num_images=num_images,
        use_cuda_graph=use_cuda_graph,
    )


@torch.no_grad()
def _run(
    model: UnifiedModel, plan: _Plan, telemetry: Telemetry | None, progress: Progress, label: str, tokens: int | None
) -> _Times:
    """One run of every stage, ``tokens`` image tokens (None: all); the telemetry (when given) covers the image
    generation."""
    clock = Clock(model.decoder.embed_tokens.weight.device)
    stages = Stages(clock)
    if plan.image is not None:
        with stages.stage("vision_encode"):
            model.vision(plan.image)
    clock.sync()
    with telemetry if telemetry is not None else contextlib.nullcontext():
        image, cuda_graph = _image(model, plan, stages, progress, label, tokens)
        clock.sync()
    text = _text(model, plan, stages) if plan.text_ids is not None else None
    clock.sync()
    return _Times(stages, image, text, cuda_graph)


def _image(
    model: UnifiedModel, plan: _Plan, stages: Stages, progress: Progress, label: str, tokens: int | None
) -> tuple[_Tokens, bool]:
    """Generate the images stage by stage, stopping after ``tokens`` tokens (None: all; the VQ decoder then reads
    zeros for the rest); returns their token marks and whether the decode step ran as a CUDA graph."""
    clock = stages.clock
    start = clock.mark()
    with stages.stage("prefill"):  # the prompt's rows through the decoder, the first token sampled
        step = start_image_generation(model, plan.prompt_ids, plan.cfg_scale, plan.temperature, seed=plan.seed,
                                      num_images=plan.num_images)  # fmt: skip
    first = clock.mark()
    total = step.tokens.shape[1] if tokens is None else min(tokens, step.tokens.shape[1])
    every = max(1, total // PROGRESS_UPDATES)
    progress(f"{label}: image tokens", 1, total)
    run = step
    graph = plan.use_cuda_graph and clock.device.type == "cuda"
    if graph:
        with stages.stage("cuda_graph_capture"):
            buffers = (step.cache.lengths, step.cache.positions, step.step, step.embeds, step.ids, step.tokens)
            run = capture_step(step, buffers=buffers).replay
    with stages.stage("decode"):
        steps = [clock.mark()]
        for done in range(2, total + 1):
            with step_range("decode_step", clock.device):
                run()
            steps.append(clock.mark())
            if done % every == 0 or done == total:
                progress(f"{label}: image tokens", done, total)
    with stages.stage("vq_decode"):
        model.decode_image_tokens(step.tokens)
    return _Tokens(start, first, steps), graph


def _text(model: UnifiedModel, plan: _Plan, stages: Stages) -> _Tokens:
    """Answer the text prompt (greedy). A token is ready when the decoder is called on it (a forward pre-hook
    marks the call), the last one when generate_text returns."""
    clock = stages.clock
    calls: list[Mark] = []
    hook = model.decoder.register_forward_pre_hook(lambda module, args: calls.append(clock.mark()))
    try:
        start = clock.mark()
        new = generate_text(model, plan.text_ids, plan.image, max_new_tokens=plan.text_tokens, temperature=0.0)
        end = clock.mark()
    finally:
        hook.remove()
    ready = (calls[1:] + [end])[: new.shape[1]]  # calls[0] is the prefill; an answer ended by EOS has fewer tokens
    stages.span("text_prefill", start, ready[0])
    if len(ready) > 1:
        stages.span("text_decode", ready[0], ready[-1])
    return _Tokens(start, ready[0], ready)


def _generation(clock: Clock, tokens: _Tokens, prompt_tokens: int, sequences: int) -> Generation:
    per_token = clock.intervals_ms(tokens.steps)
    count = len(per_token) + 1
    return Generation(
        prompt_tokens=prompt_tokens,
        tokens=count,
        sequences=sequences,
        time_to_first_token_ms=clock.ms(tokens.start, tokens.first),
        time_per_output_token_ms=sum(per_token) / len(per_token) if per_token else None,
        tokens_per_s=count * sequences / (clock.ms(tokens.start, tokens.steps[-1]) * 1e-3),
        decode=Latency.of(per_token),
        per_token_ms=per_token,
    )


def _report(model, plan: _Plan, times: _Times, memory: dict, telemetry: Telemetry, name: str, warmup: int) -> ProfileReport:
    """The report of the measured run (its marks are readable: _run synced)."""
    from fastmm.bench.suites.e2e import decode_weight_bytes  # the weights a decode step streams, as the e2e suite counts them

    clock = times.stages.clock
    device = clock.device
    dtype = model.decoder.embed_tokens.weight.dtype
    config = model.config
    image = _generation(clock, times.image, len(plan.prompt_ids), plan.num_images)
    text = None if times.text is None else _generation(clock, times.text, plan.text_ids.shape[1], 1)
    step_bytes = decode_weight_bytes(config, dtype)
    read = {"bytes_per_step": step_bytes, "gb_s": None, "peak_gb_s": None, "peak_source": None, "pct_of_peak": None}
    if image.decode is not None:
        read["gb_s"] = step_bytes / (image.decode.p50_ms * 1e-3) / 1e9
    if device.type == "cuda":
        peaks = gpu_peaks(torch.cuda.get_device_name(device))
        read["peak_gb_s"], read["peak_source"] = peaks.bandwidth_gb_s, peaks.source
    else:
        read["peak_source"] = "CPU copy bandwidth not measured here (fastmm info measures it)"
    if read["gb_s"] is not None and read["peak_gb_s"]:
        read["pct_of_peak"] = 100 * read["gb_s"] / read["peak_gb_s"]
    return ProfileReport(
        model={"source": name, "layers": config.num_layers, "hidden": config.hidden_size,
               "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
               "device": str(device)},  # fmt: skip
        environment={
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": environment.git_sha(),
            "versions": environment.versions(),
            "cpu": cpu_model(),
            "device": environment.device_name(device),
            "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        settings={"prompt_ids": plan.prompt_ids, "image": plan.image is not None, "text_tokens": plan.text_tokens,
                  "cfg_scale": plan.cfg_scale, "temperature": plan.temperature, "seed": plan.seed,
                  "num_images": plan.num_images, "warmup": warmup, "cuda_graph": times.cuda_graph},  # fmt: skip
        stages=times.stages.durations_ms(),
        image=image,
        text=text,
        decode_weight_read=read,
        memory=memory,
        telemetry=telemetry.result(plan.num_images),
    )
