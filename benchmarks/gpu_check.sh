#!/usr/bin/env bash
# One-command GPU check: everything the README's GPU tables need, from one run on one CUDA GPU.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]      (default OUT_DIR: gpu-results/<UTC date-time>)
#
# Stages, each under its own timeout; a stage that fails or times out is recorded and the next one runs:
#   setup      .venv by the Makefile's setup, with a CUDA build of torch: the machine's own python's when it
#              has torch==TORCH_VERSION built with CUDA, else the registry's (see install_cuda_torch)
#   env        git sha and status, pip freeze, nvidia-smi -q, fastmm info (text and JSON)
#   tests      every CUDA test: pytest -k "cuda or gpu or split" (the (backend, "cuda") cases of backend_cases, the
#              tests marked gpu, the CUDA-graph tests, the split-vocabulary sampling and verification), junit XML
#   bench      fastmm bench all --device cuda --quick (report.md, report.json, plots/)
#   e2e-1b     the e2e suite's 1B-shaped case (24 x 2048, bf16, 576 image tokens: the GPU targets' shape), fastmm
#              with and without the CUDA graph
# Timeouts: setup 300 s (mostly the CUDA torch download on a bare machine); the others sum to 465 s, so that the
# check fits 8 minutes of GPU time once the machine is set up. Exit status: 0 when every stage passed, else 1.
# OUT_DIR/summary.md lists each stage's result, time and log.

set -u -o pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg (expected --dry-run or an output folder)" >&2; exit 2 ;;
        *)
            if [ -n "$OUT" ]; then
                echo "gpu_check.sh: one output folder expected, got $OUT and $arg" >&2
                exit 2
            fi
            OUT="$arg"
            ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-gpu-results/$(date -u +%Y%m%d-%H%M%S)}"
TORCH_VERSION="$(sed -n 's/^TORCH_VERSION := //p' Makefile)"
export PY="$ROOT/.venv/bin/python"
export OUT TORCH_VERSION

# name|timeout in seconds|what it runs
STAGES=(
    "setup|300|make setup; torch==$TORCH_VERSION for CUDA: the machine python's if it has one, else the registry's"
    "env|45|git rev-parse HEAD / status; pip freeze; nvidia-smi -q; fastmm info --json"
    "tests|165|pytest -n 8 -v -k 'cuda or gpu or split' tests --junitxml"
    "bench|75|fastmm bench all --device cuda --quick --out OUT/bench"
    "e2e-1b|180|e2e suite, preset 1b, bfloat16, 576 tokens: time_to_first_token and image_tokens"
)

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh --dry-run: would write to $OUT"
    for stage in "${STAGES[@]}"; do
        IFS='|' read -r name limit what <<<"$stage"
        printf '  %-7s %4ss  %s\n' "$name" "$limit" "$what"
    done
    exit 0
fi

gpu_present() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

torch_has_cuda() { "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; }

system_torch_fits() {  # the machine's own python already holds torch==TORCH_VERSION built with CUDA
    "${PYTHON_BOOT:-python3}" -c "import sys, torch
sys.exit(not (torch.version.cuda and torch.__version__.split('+')[0] == '$TORCH_VERSION'))" 2>/dev/null
}

install_cuda_torch() {
    # The registry's (PyPI's) Linux x86_64 torch wheel is the CUDA build. A machine's pip configuration may
    # point pip at a local CPU wheel (find-links, an extra index, constraints: so does the CPU development
    # machine's), and 2.13.0+cpu would satisfy torch==2.13.0: for this one install that configuration is set
    # aside. Its dependencies come along (the CUDA libraries, the triton version that torch build pins).
    "$PY" -m pip uninstall -q -y torch
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        "$PY" -m pip install -q "torch==$TORCH_VERSION"
}

stage_setup() {
    if ! gpu_present; then
        echo "no GPU: nvidia-smi -L failed"
        return 1
    fi
    # A bare machine: the CUDA torch first (the machine's own when it fits, no download), and the stamp that
    # makes the Makefile skip its CPU build.
    if [ ! -x "$PY" ] && system_torch_fits; then
        "${PYTHON_BOOT:-python3}" -m venv --system-site-packages .venv && touch .venv/.torch || return 1
    elif [ ! -x "$PY" ]; then
        "${PYTHON_BOOT:-python3}" -m venv .venv && "$PY" -m pip install -q --upgrade pip && install_cuda_torch \
            && touch .venv/.torch || return 1
    fi
    make setup || return 1
    if ! torch_has_cuda; then
        echo "the venv's torch has no CUDA: installing the CUDA build of torch==$TORCH_VERSION"
        install_cuda_torch || return 1
    fi
    "$PY" -c 'import torch
assert torch.cuda.is_available(), "torch sees no GPU"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
}

stage_env() {
    local dir="$OUT/env" failed=0
    mkdir -p "$dir"
    { git rev-parse HEAD; git status --short; } >"$dir/git.txt" 2>&1 || failed=1
    "$PY" -m pip freeze >"$dir/pip-freeze.txt" 2>&1 || failed=1
    nvidia-smi -q >"$dir/nvidia-smi-q.txt" 2>&1 || failed=1
    nvidia-smi >"$dir/nvidia-smi.txt" 2>&1 || failed=1
    "$PY" -m fastmm.cli info --json "$dir/fastmm-info.json" >"$dir/fastmm-info.txt" 2>&1 || failed=1
    return "$failed"
}

stage_tests() {
    mkdir -p "$OUT/tests"
    # -v: a line per test as it ends, so that a run cut by the timeout still shows how far it got; 8 workers
    # compile Triton kernels side by side (the CPU-bound part), the GPU runs their small tests together.
    "$PY" -m pytest -v -p no:cacheprovider -n 8 -rfEs -k "cuda or gpu or split" --junitxml="$OUT/tests/junit.xml" tests
}

stage_bench() {
    "$PY" -m fastmm.cli bench all --device cuda --quick --out "$OUT/bench"
}

stage_e2e_1b() {
    "$PY" - "$OUT/e2e-1b" <<'PYTHON'
"""The e2e suite's 1B-shaped case alone, written like `fastmm bench` writes a suite. transformers' eager
Janus-1B loop is left out: at tens of ms per token it needs minutes per timed case (the small cases of
`fastmm bench e2e` keep that baseline)."""
import dataclasses
import pathlib
import sys

import torch

from fastmm.bench import report, runner
from fastmm.bench.suites import e2e, suites

e2e._hf_model = lambda path, dtype, device: None  # no transformers provider: it is not loaded at all
full = suites()["e2e"]
suite = dataclasses.replace(
    full,
    description=full.description + "\n\nThis report (benchmarks/gpu_check.sh): the 1B-shaped case alone, bf16, "
    "576 tokens, fastmm with and without the CUDA graph; transformers' eager loop is left out for time.",
    cases=lambda device, quick: e2e.e2e_cases("1b", torch.bfloat16, device, 576, with_pixels=False),
    providers={name: text for name, text in full.providers.items() if name != "transformers"},
    targets=tuple(target for target in full.targets if target.where.get("hidden") == 2048),
)


def progress(done, total, label):
    print(f"[{done}/{total}] {label}", flush=True)


result = runner.run([suite], torch.device("cuda"), progress=progress)
for path in report.write(result, {suite.name: suite}, pathlib.Path(sys.argv[1])):
    print("wrote", path)
failed = [row for row in result.results if row.error]
for row in failed:
    print(f"{row.op} {row.provider}: {row.error}")
sys.exit(1 if failed else 0)
PYTHON
}

export -f gpu_present torch_has_cuda system_torch_fits install_cuda_torch
export -f stage_setup stage_env stage_tests stage_bench stage_e2e_1b

mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary.md"
{
    echo "# fastmm GPU check"
    echo
    echo "- started: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo
    echo "| stage | result | seconds | log |"
    echo "| --- | --- | --- | --- |"
} >"$SUMMARY"

FAILED=()
for stage in "${STAGES[@]}"; do
    IFS='|' read -r name limit _ <<<"$stage"
    log="$OUT/logs/$name.log"
    echo "== $name (timeout ${limit}s): log $log"
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "stage_${name//-/_}" >"$log" 2>&1
    rc=$?
    took=$((SECONDS - start))
    case "$rc" in
        0) result="passed" ;;
        124 | 137) result="TIMED OUT after ${limit}s"; FAILED+=("$name") ;;
        *) result="FAILED (exit $rc)"; FAILED+=("$name") ;;
    esac
    echo "   $result in ${took}s"
    [ "$rc" = 0 ] || tail -n 5 "$log" | sed 's/^/   | /'
    echo "| $name | $result | $took | logs/$name.log |" >>"$SUMMARY"
done

echo -e "\n- total: ${SECONDS}s" >>"$SUMMARY"
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "every stage passed" | tee -a "$SUMMARY"
    exit 0
fi
echo "failed stages: ${FAILED[*]}" | tee -a "$SUMMARY"
exit 1
