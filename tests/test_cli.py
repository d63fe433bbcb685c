"""The `fastmm` command and the benchmark harness under it: commands run, reports are written and parse back
into the schema, timer statistics are ordered. No speed is asserted here: figures belong to `make bench`."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from fastmm.backend import BACKENDS, native_status
from fastmm.bench import memory, timer
from fastmm.bench import runner as bench_runner
from fastmm.bench.schema import BenchResult, TargetCheck
from fastmm.bench.suites import Suite, Target
from fastmm.cli import app

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"fastmm {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    return result


def test_info_reports_every_backend(tmp_path):
    path = tmp_path / "info.json"
    _invoke("info", "--no-roofline", "--json", str(path))
    payload = json.loads(path.read_text())
    assert set(payload["backends"]) == set(BACKENDS)
    assert payload["backends"]["reference"]["cpu"]["available"] is True
    assert "torch" in payload["versions"] and payload["torch_threads"] >= 1
    assert set(payload["openmp_environment"]) == {"OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}
    assert "cpu_roofline" not in payload


def test_kernels_lists_registered_configurations(tmp_path):
    path = tmp_path / "kernels.json"
    _invoke("kernels", "--json", str(path))
    records = json.loads(path.read_text())
    assert {"_norm_fwd_kernel", "_norm_bwd_kernel"} <= {record["kernel"] for record in records}
    assert all(record["warps"] >= 1 and record["config"] for record in records)


def test_unknown_suite_is_rejected_by_name():
    result = runner.invoke(app, ["bench", "no-such-suite"])
    assert result.exit_code != 0
    assert "no-such-suite" in result.output


def test_quick_norm_bench_writes_reports_that_parse_back(tmp_path):
    _invoke("bench", "norm", "--quick", "--device", "cpu", "--out", str(tmp_path))
    assert (tmp_path / "report.md").read_text().strip()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == 1
    rows = [BenchResult(**row) for row in report["results"]]
    assert rows and all(dataclasses.asdict(row) == raw for row, raw in zip(rows, report["results"]))
    assert {row.provider for row in rows} >= {"fastmm", "mplug_owl2"}
    fastmm_rows = [row for row in rows if row.provider == "fastmm"]
    assert all(row.backend == "native" and row.median_ms > 0 and row.speedup_vs for row in fastmm_rows)
    assert all(row.p20_ms <= row.median_ms <= row.p80_ms for row in rows if not row.error)
    [TargetCheck(**check) for check in report["targets"]]
    assert report["environment"]["threads"] == torch.get_num_threads()


def test_timer_percentiles_are_ordered_and_count_runs():
    timing = timer.cpu_time(lambda: time.sleep(0.001), warmup_s=0.0, min_time_s=0.02, min_reps=5)
    assert timing.reps >= 5
    assert timing.min_ms <= timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert timing.min_ms >= 1.0  # each run sleeps 1 ms: the timer cannot report less
    assert timing.threads == torch.get_num_threads()


def test_interleaved_timer_reports_a_failing_function_without_stopping():
    def broken():
        raise RuntimeError("provider broke")

    found = timer.cpu_time_interleaved({"ok": lambda: None, "broken": broken}, min_time_s=0.003)
    assert isinstance(found["broken"], RuntimeError)
    assert isinstance(found["ok"], timer.Timing) and found["ok"].reps >= 3


@pytest.mark.parametrize("times, median", [([3.0, 1.0, 2.0], 2.0), ([5.0], 5.0)])
def test_summarize_takes_the_median(times, median):
    stats = timer.summarize(times)
    assert stats.median_ms == median and stats.min_ms == min(times) and stats.reps == len(times)


def test_quick_vq_bench_records_peak_allocation(tmp_path):
    _invoke("bench", "vq", "--quick", "--device", "cpu", "--out", str(tmp_path))
    rows = [BenchResult(**row) for row in json.loads((tmp_path / "report.json").read_text())["results"]]
    by_provider = {(row.provider, row.shape["N"], row.dtype): row for row in rows}
    recipe, ours = by_provider[("transformers", 300, "float32")], by_provider[("fastmm", 300, "float32")]
    n_by_k_mib = 300 * 1000 * 4 / 2**20  # the recipe's distance matrix
    assert recipe.peak_alloc_mib >= n_by_k_mib
    assert ours.peak_alloc_mib is not None and ours.rel_err is None and recipe.rel_err is not None


def test_peak_torch_allocation_sees_temporaries():
    def two_temporaries():
        a = torch.empty(2**20)  # 4 MiB, freed before b is allocated
        del a
        b = torch.empty(2**19)
        return b

    peak = memory.peak_torch_allocation(two_temporaries, torch.device("cpu"))
    assert 4 * 2**20 <= peak < 6 * 2**20


def test_memory_target_is_met_when_at_most_the_goal():
    target = Target("op", {"N": 1}, "memory_pct:recipe", 5, "native")
    row = lambda provider, mib: BenchResult(  # noqa: E731
        "s", "op", provider, {"N": 1}, "float32", "cpu", 2, 1.0, 1.0, 1.0, 3, 0, 0, None, None, None, "",
        {}, backend="native", peak_alloc_mib=mib,
    )
    suite = Suite("s", "", {}, lambda device, quick: [], (target,))
    for ours, met in ((4.0, True), (6.0, False)):
        [check] = bench_runner.check_targets(suite, [row("fastmm", ours), row("recipe", 100.0)])
        assert check.value == ours and check.met is met


def test_a_dtype_target_is_checked_on_that_dtype_only():
    target = Target("op", {"N": 1}, "speedup:recipe", 10, "native", dtype="float32")
    row = lambda dtype, speedup: BenchResult(  # noqa: E731
        "s", "op", "fastmm", {"N": 1}, dtype, "cpu", 2, 1.0, 1.0, 1.0, 3, 0, 0, None, None, None, "",
        {"recipe": speedup}, backend="native",
    )
    suite = Suite("s", "", {}, lambda device, quick: [], (target,))
    [check] = bench_runner.check_targets(suite, [row("float32", 20.0), row("bfloat16", 2.0)])
    assert check.dtype == "float32" and check.value == 20.0 and check.met
    assert "float32" in target.describe()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_generate_demo_writes_a_png(tmp_path):
    result = _invoke("generate", "--demo", "--temperature", "0", "--out", str(tmp_path / "demo.png"),
                     "--json", str(tmp_path / "summary.json"))  # fmt: skip
    assert "noise from random weights" in result.output
    assert _png_size(tmp_path / "demo.png") == (48, 48)  # the tiny preset's tokenizer: 24 x 24 tokens, one 2x level
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["image_tokens"] == 576 and summary["ms_per_token"] > 0


def test_generate_with_jacobi_reports_the_window(tmp_path):
    """--jacobi decodes by SJD; greedy gives the sequential tokens' image, and the summary names the window."""
    common = ("generate", "--demo", "--temperature", "0", "--seed", "1")
    _invoke(*common, "--out", str(tmp_path / "seq.png"))
    _invoke(*common, "--jacobi", "4", "--out", str(tmp_path / "sjd.png"), "--json", str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jacobi_window"] == 4 and 0 < summary["decoder_passes"] <= 575
    assert (tmp_path / "seq.png").read_bytes() == (tmp_path / "sjd.png").read_bytes()


def test_generate_from_a_checkpoint(tmp_path, janus_dir):
    from fastmm.models import presets

    ids = ",".join(str(i) for i in (presets.BOS, 10, 11, presets.BOI))
    _invoke("generate", "--model", str(janus_dir), "--prompt-ids", ids, "--num-images", "2", "--seed", "3",
            "--out", str(tmp_path / "img.png"))  # fmt: skip
    assert _png_size(tmp_path / "img_0.png") == _png_size(tmp_path / "img_1.png") == (48, 48)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "either --model PATH or --demo"),
        (["--demo", "--prompt-ids", "1,x"], "comma-separated integers"),
        (["--demo", "--dtype", "fp8"], "fp32"),
        (["--demo", "--jacobi", "wide"], "a window (an integer >= 1) or 'auto'"),
        (["--demo", "--jacobi", "0"], "window must be an int"),
    ],
)
def test_generate_rejects_bad_arguments(args, message):
    result = runner.invoke(app, ["generate", *args])
    assert result.exit_code != 0 and message in result.output


def test_quick_e2e_bench_compares_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    _invoke("bench", "e2e", "--quick", "--device", "cpu", "--out", str(tmp_path))
    rows = [BenchResult(**row) for row in json.loads((tmp_path / "report.json").read_text())["results"]]
    assert {row.op for row in rows} == {"time_to_first_token", "image_tokens", "image_tokens_sampled"}
    assert {row.provider for row in rows} == {"fastmm", "fastmm_sjd", "fastmm_sjd_auto", "transformers"}
    assert not [row.error for row in rows if row.error]
    tokens = [row for row in rows if row.op == "image_tokens"]
    assert all(row.ms_per_item is not None for row in tokens)
    assert all(row.rel_err == 0 for row in tokens if row.provider != "fastmm"), "greedy tokens must agree"
    sjd = [row for row in rows if row.provider.startswith("fastmm_sjd")]
    assert len(sjd) == 4 and all("decoder passes" in row.note for row in sjd)


def test_quick_linear_bench_checks_fastmm_against_torch(tmp_path):
    _invoke("bench", "linear", "--quick", "--device", "cpu", "--out", str(tmp_path))
    rows = [BenchResult(**row) for row in json.loads((tmp_path / "report.json").read_text())["results"]]
    native_bf16 = {"native_skinny"} if native_status()[0] else set()  # the kernel past bf16's routing limit
    assert {row.provider for row in rows} == {"fastmm", "torch"} | native_bf16 and not [row for row in rows if row.error]
    assert all(row.rel_err is not None and row.rel_err < 1e-2 for row in rows if row.provider != "fastmm")


def test_quick_sampling_bench_runs_both_providers(tmp_path):
    _invoke("bench", "sampling", "--quick", "--device", "cpu", "--out", str(tmp_path))
    rows = [BenchResult(**row) for row in json.loads((tmp_path / "report.json").read_text())["results"]]
    assert {row.provider for row in rows} == {"fastmm", "torch"} and not [row for row in rows if row.error]


def test_eager_sampling_baseline_keeps_the_top_p_nucleus():
    """The suite's baseline samples only from the fewest top ids whose mass reaches top_p."""
    from fastmm.bench.suites.sampling import eager_step

    logits = torch.tensor([[4.0, 3.0, 0.0, -9.0], [0.0, 0.0, 0.0, 0.0]])  # cond row over uncond row, scale 1
    drawn = {int(eager_step(logits, 1.0, 0.9)) for _ in range(200)}
    probabilities = torch.tensor([4.0, 3.0, 0.0, -9.0]).softmax(0)  # 0.72, 0.26, 0.013, ...: ids 0, 1 reach 0.9
    assert probabilities[:2].sum() >= 0.9 > probabilities[0]
    assert drawn == {0, 1}
