"""The `fastmm` command: info | bench | kernels | generate | profile.

    fastmm info [--no-roofline] [--json PATH]      versions, devices, backends, telemetry, CPU roofline
    fastmm bench SUITE|all [--out DIR] [--json PATH] [--quick] [--device auto|cpu|cuda]
    fastmm kernels [--aot] [--json PATH]           registered Triton kernels; --aot compiles them for sm_80/90
    fastmm generate --model PATH --prompt-ids 1,2,3 --out image.png    Janus-recipe image generation
    fastmm generate --demo                         the same on a small random-weight model (no weights needed)
    fastmm profile --model PATH | --demo [--trace trace.json] [--png profile.png] [--json PATH]
                                                   stage times, per-token latency, memory, NVML telemetry

Human output goes to stdout as rich tables, progress and warnings to stderr, and ``--json PATH`` writes the
same content for machines. Also runs as ``python -m fastmm.cli``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Any, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="fastmm: kernels for unified multimodal models.", no_args_is_help=True, add_completion=False)
# Tables keep their columns when stdout is a file or a pipe (rich would squeeze them into 80 columns).
out = Console() if sys.stdout.isatty() else Console(width=240)
err = Console(stderr=True)

JsonOption = typer.Option(None, "--json", help="Also write the result as JSON to this path.", dir_okay=False)
# The OpenMP settings the native kernels run under: the thread count (torch.set_num_threads overrides it) and
# how idle threads wait (libgomp spins for a while before sleeping unless OMP_WAIT_POLICY=PASSIVE).
OPENMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _print_table(title: str, headers: list[str], body: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header)
    for line in body:
        table.add_row(*(Text(cell) for cell in line))  # Text: brackets in an error message are not markup
    out.print(table)


def _print_records(title: str, records: list[dict[str, Any]]) -> None:
    """A table with one row per record, columns named by the keys (the keys of the --json output)."""
    headers = list(records[0]) if records else []
    _print_table(title, headers, [[str(value) for value in record.values()] for record in records])


def _write_json(path: Optional[pathlib.Path], payload: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        err.print(f"wrote {path}", markup=False)


def _target_device(device: str) -> torch.device:
    """--device auto|cpu|cuda -> the device to run on (auto: CUDA when torch sees one)."""
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"expected auto, cpu or cuda, got {device!r}", param_hint="--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("cuda asked for, but torch sees no CUDA device", param_hint="--device")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def _availability(available: bool, reason: str) -> dict[str, Any]:
    return {"available": available, "reason": reason}


def _yes_no(available: bool, reason: str) -> str:
    return ("yes" if available else "no") + ("" if reason == "ok" else f" ({reason})")


@app.command()
def info(
    roofline: bool = typer.Option(True, "--roofline/--no-roofline", help="Measure the CPU roofline (a few seconds)."),
    json_path: Optional[pathlib.Path] = JsonOption,
) -> None:
    """Versions, devices, backend availability (with the reason when not), NVML telemetry, CPU roofline."""
    from fastmm.backend import BACKENDS, backend_status
    from fastmm.bench import environment
    from fastmm.bench.roofline import cpu_model, cpu_peaks
    from fastmm.profiling.telemetry import nvml_status

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    payload: dict[str, Any] = {
        "versions": environment.versions(),
        "cpu": cpu_model(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA",
        "torch_threads": torch.get_num_threads(),
        "openmp_environment": {name: os.environ.get(name) for name in OPENMP_VARIABLES},
        "telemetry": _availability(*nvml_status()),
        "backends": {name: {d.type: _availability(*backend_status(name, d)) for d in devices} for name in BACKENDS},
    }
    _print_table("versions", ["package", "version"], [list(item) for item in payload["versions"].items()])
    machine = [
        ["cpu", payload["cpu"]],
        ["cuda device", payload["cuda_device"]],
        ["torch threads", f"{payload['torch_threads']} (native kernels use up to this many OpenMP threads per call)"],
        *[[name, value or "unset"] for name, value in payload["openmp_environment"].items()],
        ["NVML telemetry", _yes_no(**payload["telemetry"])],
    ]
    _print_table("machine", ["item", "value"], machine)
    backends = payload["backends"].items()
    body = [[name] + [_yes_no(**found) for found in by_device.values()] for name, by_device in backends]
    _print_table("backends", ["backend"] + [d.type for d in devices], body)
    if roofline:
        with err.status("measuring the CPU roofline (copy bandwidth, fp32 and bf16 GEMM)..."):
            peaks = cpu_peaks()
        rows = [["copy bandwidth", f"{peaks.bandwidth_gb_s:.1f} GB/s"]]
        rows.append(["copy into a new buffer", f"{peaks.fresh_copy_gb_s:.1f} GB/s"])
        rows += [[f"{dtype} GEMM", f"{value:,.0f} GFLOP/s"] for dtype, value in peaks.gemm_gflop_s.items()]
        rows.append(["how", peaks.source])
        _print_table("CPU roofline", ["peak", "value"], rows)
        payload["cpu_roofline"] = dataclasses.asdict(peaks)
    _write_json(json_path, payload)


@app.command()
def bench(
    suite: str = typer.Argument(..., help="A registered suite (e.g. norm) or 'all'."),
    out_dir: pathlib.Path = typer.Option(
        pathlib.Path("bench-results"), "--out", help="Where report.md, report.json and plots/ go."
    ),
    json_path: Optional[pathlib.Path] = JsonOption,
    quick: bool = typer.Option(False, "--quick", help="Tiny shapes, short timings: a smoke test of the harness."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
) -> None:
    """Run benchmark suites; print tables, write report.md / report.json / plots into --out."""
    from fastmm.bench import report as report_io
    from fastmm.bench import runner
    from fastmm.bench.suites import suites

    registered = suites()
    if suite != "all" and suite not in registered:
        raise typer.BadParameter(f"expected 'all' or one of {sorted(registered)}, got {suite!r}", param_hint="SUITE")
    target = _target_device(device)
    selected = list(registered.values()) if suite == "all" else [registered[suite]]

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("measuring the roofline", total=None)

        def on_case(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=label)
            if not err.is_terminal:  # a log file gets no live bar: one line per case instead
                err.print(f"[{done}/{total}] {label}", markup=False)

        result = runner.run(selected, target, quick=quick, progress=on_case)

    for (suite_name, op), rows in report_io.group(result.results).items():
        headers, body = report_io.op_table(rows)
        _print_table(f"{suite_name} / {op} on {rows[0].device}", headers, body)
    if result.targets:
        _print_table("targets (reported, not asserted)", *report_io.target_table(result.targets))
    for path in report_io.write(result, registered, out_dir):
        err.print(f"wrote {path}", markup=False)
    _write_json(json_path, result.to_dict())
    failed = [row for row in result.results if row.error]
    if failed:
        err.print(f"[red]{len(failed)} provider run(s) failed; see the note column[/red]")
        raise typer.Exit(1)


@app.command()
def kernels(
    aot: bool = typer.Option(False, "--aot", help="Compile every kernel configuration for sm_80 and sm_90 (no GPU)."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="With --aot: compile only this kernel."),
    json_path: Optional[pathlib.Path] = JsonOption,
) -> None:
    """List the registered Triton kernels; with --aot, compile them and show registers, shared memory and spills
    (exit status 1 if any configuration fails, spills or exceeds shared memory)."""
    from fastmm.triton import aot as aot_module

    if not aot:
        records = [
            {"kernel": entry.name, "config": config.label, "warps": config.num_warps, "stages": config.num_stages}
            for entry in aot_module.registered_kernels()
            for config in entry.configs
        ]
        _print_records("registered Triton kernels", records)
        _write_json(json_path, records)
        return
    with err.status("compiling every Triton kernel configuration for sm_80 and sm_90..."):
        results = aot_module.compile_all(kernel=kernel)
    records = [
        {"kernel": r.kernel, "config": r.config, "arch": r.arch, "registers": r.registers, "shared": r.shared,
         "spills": r.spills, "ok": r.ok, "error": r.error}
        for r in results
    ]
    _print_records("AOT compilation (shared: bytes per block, spills: local bytes per thread)", records)
    _write_json(json_path, records)
    bad = [result for result in results if not result.ok]
    if bad:
        err.print(f"[red]{len(bad)} of {len(results)} kernel configurations are not ok[/red]")
        raise typer.Exit(1)
    if not results:
        err.print("no Triton kernels are registered")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--prompt-ids") from None
    if not ids:
        raise typer.BadParameter("expected at least one id", param_hint="--prompt-ids")
    return ids


def _model_options(model_path, demo: bool, preset: str, dtype: str, device: str):
    """(device, the demo model or None) from the --model / --demo / --preset / --dtype / --device options that
    generate and profile share, refusing a bad combination with the option named."""
    from fastmm.models import presets

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    target = _target_device(device)
    if demo == (model_path is not None):
        raise typer.BadParameter("give either --model PATH or --demo", param_hint="--model")
    if not demo:
        return target, None
    if preset not in presets.PRESETS:
        raise typer.BadParameter(f"expected one of {presets.PRESETS}, got {preset!r}", param_hint="--preset")
    return target, presets.demo_model(preset, _DTYPES[dtype], target)


@app.command()
def generate(
    model_path: Optional[pathlib.Path] = typer.Option(None, "--model", help="A transformers Janus checkpoint directory."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Comma-separated prompt token ids (ending with BOI)."),
    out_path: pathlib.Path = typer.Option(pathlib.Path("image.png"), "--out", help="PNG path (name_<i>.png for several)."),
    demo: bool = typer.Option(False, "--demo", help="Use a small random-weight model: no checkpoint needed."),
    preset: str = typer.Option("tiny", "--preset", help="With --demo: tiny, small or 1b (random weights)."),
    cfg_scale: float = typer.Option(5.0, "--cfg-scale", help="Classifier-free guidance scale (1 = none)."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    num_images: int = typer.Option(1, "--num-images"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="Replay the decode step as a CUDA graph."),
    jacobi: Optional[str] = typer.Option(None, "--jacobi", help="Speculative Jacobi decoding: a window W or 'auto'."),
    json_path: Optional[pathlib.Path] = JsonOption,
) -> None:
    """Generate images: the prompt through the decoder, image tokens with guided sampling, VQ decode to PNG."""
    from fastmm.image_io import save_png
    from fastmm.models import UnifiedModel
    from fastmm.models import presets
    from fastmm.runtime import Jacobi, generate_image

    parallel = None
    if jacobi is not None:
        if jacobi != "auto" and not jacobi.isdigit():
            raise typer.BadParameter(f"a window (an integer >= 1) or 'auto', got {jacobi!r}", param_hint="--jacobi")
        try:
            parallel = Jacobi(window=jacobi if jacobi == "auto" else int(jacobi))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--jacobi") from None

    target, demo_model = _model_options(model_path, demo, preset, dtype, device)
    if demo_model is not None:
        model = demo_model
        ids = _parse_ids(prompt_ids) if prompt_ids else [presets.BOS, 10, 11, 12, 13, presets.BOI]
        err.print(f"demo: random-weight '{preset}' model; the picture will be noise from random weights", markup=False)
    else:
        if prompt_ids is None:
            raise typer.BadParameter("required with --model", param_hint="--prompt-ids")
        ids = _parse_ids(prompt_ids)
        model = UnifiedModel.from_pretrained(model_path, dtype=_DTYPES[dtype], device=target)

    columns = (TextColumn("image tokens"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("generate", total=model.config.image_gen.num_image_tokens)
        result = generate_image(
            model, ids, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            num_images=num_images, use_cuda_graph=cuda_graph, parallel=parallel,
            progress=lambda done, total: progress.update(task, completed=done),
        )  # fmt: skip
    paths = [
        save_png(image, out_path if num_images == 1 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}"))
        for i, image in enumerate(result.pixels)
    ]
    summary = {
        "images": [str(p) for p in paths],
        "device": str(target),
        "dtype": dtype,
        "image_tokens": result.tokens.shape[1],
        "time_to_first_token_ms": round(1e3 * result.time_to_first_token_s, 2),
        "ms_per_token": round(result.ms_per_token, 3),
        "vq_decode_ms": round(1e3 * result.vq_decode_s, 1),
        "cuda_graph": result.cuda_graph,
    }
    if parallel is not None:
        summary |= {"jacobi_window": result.window, "decoder_passes": result.decoder_passes,
                    "tokens_per_pass": round((result.tokens.shape[1] - 1) / max(result.decoder_passes, 1), 2)}
    _print_records("fastmm generate", [summary])
    _write_json(json_path, summary)


@app.command()
def profile(
    model_path: Optional[pathlib.Path] = typer.Option(None, "--model", help="A transformers Janus checkpoint directory."),
    demo: bool = typer.Option(False, "--demo", help="A random-weight model and a random image: no checkpoint needed."),
    preset: str = typer.Option("tiny", "--preset", help="With --demo: tiny, small or 1b (random weights)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Comma-separated image prompt ids (default: BOS, 4 ids, BOI)."),
    image: Optional[pathlib.Path] = typer.Option(None, "--image", help="Image for the vision encoder (--demo: random).", dir_okay=False),
    text_tokens: int = typer.Option(0, "--text-tokens", help="Also answer a text prompt (with the image) in this many greedy tokens."),
    cfg_scale: float = typer.Option(5.0, "--cfg-scale", help="Classifier-free guidance scale (1 = none)."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 = greedy."),
    seed: int = typer.Option(0, "--seed"),
    num_images: int = typer.Option(1, "--num-images"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="Replay the decode step as a CUDA graph."),
    warmup: int = typer.Option(1, "--warmup", help="Unreported runs before the measured one."),
    trace: Optional[pathlib.Path] = typer.Option(None, "--trace", help="Write a torch.profiler Chrome trace of one more run.", dir_okay=False),
    trace_tokens: int = typer.Option(64, "--trace-tokens", help="Image tokens of the traced run (0: all)."),
    png: pathlib.Path = typer.Option(pathlib.Path("profile.png"), "--png", help="Plot of per-token latency and stages.", dir_okay=False),
    telemetry_interval_ms: float = typer.Option(50.0, "--telemetry-interval-ms", help="NVML sampling period."),
    json_path: Optional[pathlib.Path] = JsonOption,
) -> None:
    """Profile one image generation (and optionally a text answer): stage times, time to first token, per-token
    latency p50 / p90 / p99, tokens/s, peak memory, NVML power / clocks / energy; optional Chrome trace."""
    from fastmm.profiling import profile as run_profile
    from fastmm.profiling.report import tables

    target, demo_model = _model_options(model_path, demo, preset, dtype, device)
    if demo_model is not None:
        model, name = demo_model, f"demo '{preset}' (random weights)"
    else:
        model, name = model_path, str(model_path)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("loading", total=None)
        report = run_profile(
            model, _parse_ids(prompt_ids) if prompt_ids else None, image if image is not None else ("random" if demo else None),
            text_tokens=text_tokens, cfg_scale=cfg_scale, temperature=temperature, seed=seed, num_images=num_images,
            warmup=warmup, use_cuda_graph=cuda_graph, trace=trace, trace_tokens=trace_tokens or None, png=png, json_path=json_path,
            telemetry_interval_s=telemetry_interval_ms / 1e3, dtype=_DTYPES[dtype], device=target, name=name,
            progress=lambda what, done, total: progress.update(task, description=what, completed=done, total=total),
        )  # fmt: skip
    for title, headers, body in tables(report):
        _print_table(f"fastmm profile: {title}", headers, body)
    for path in (report.trace, report.png, json_path):
        if path is not None:
            err.print(f"wrote {path}", markup=False)


def main() -> None:
    """Entry point of the `fastmm` script (pyproject) and of `python -m fastmm.cli`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
