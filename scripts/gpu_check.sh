#!/usr/bin/env bash
# The accelerator check of issue 10, for a lent GPU machine (or, with --device cpu, any machine):
#   1. versions: python, jax, jaxlib, flax, torch, transformers, ...; jax's devices; nvidia-smi -L
#   2. the device-sensitive tests (bf16 parity, the sharded path on one device, decode compile counts,
#      steering, cuDNN attention) with `python -m pytest`, run on the GPU (EMOJAX_TEST_PLATFORMS, see
#      tests/conftest.py); on a GPU, meanwhile, the default suite on that machine's CPU with its jax
#      (pytest-xdist): cpu_suite.txt
#   3. scripts/bench_kernels.py: the Pallas kernels against their references, values and times: kernels.jsonl
#   4. scripts/bench.py --only decode,sae,dump: emojax vs transformers / PyTorch in the same run
#   5. (GPU, time permitting) the forward with --attention xla vs cudnn: attention.jsonl; the SAE step with
#      sae.decoder gather: sae_gather.jsonl
#   6. (only with --world SECONDS) scripts/world_scale.sh: the built-in world's model trained for SECONDS on the
#      device and its diagnostics (issue N): world/ (the model folder comes back); raise --budget by SECONDS + 200
# Everything lands in $OUT (a temp folder when unset): versions.txt, pytest.txt, cpu_suite.txt, kernels.jsonl,
# bench.jsonl, bench.log, attention.jsonl, sae_gather.jsonl. Each step has a timeout so the whole stays within
# --budget seconds; a failed step does not stop the next, and the exit status is 1 if any failed.
#
#   scripts/gpu_check.sh [--device gpu|cpu] [--model-shape 1b|50m|tiny] [--budget 540] [--skip-tests]
#                        [--benches decode,sae,dump] [--suite "tests"] [--world SECONDS]
#
# --benches is bench.py's --only, in the order they run; --suite the pytest paths of the CPU suite. Where emojax is
# not installed (a bare copy of the repository), it is installed in place first (pip -e, offline, no deps), since
# its subpackages emojax.kernels and emojax.pipelines exist only through the install's mapping.
#
# Defaults: --device gpu --model-shape 1b (TinyLlama-1.1B's shape). `--device cpu --model-shape tiny` runs the
# same steps on CPU in ~2 minutes; there the GPU-only checks (nvidia-smi, the GPU backend checks, running the
# tests on the accelerator) are skipped with a notice, and the test selection is only collected (the default
# suite runs those tests on CPU). Runs from a copy of the repository with PYTHONPATH=. (installed in place where
# needed, above), and `import apache_beam` is made to fail throughout, as on the GPU image, which has no Beam.
set -u -o pipefail

DEVICE=gpu
SHAPE=1b
BUDGET=540
SKIP_TESTS=0
BENCHES=decode,sae,dump
SUITE=tests
WORLD_SECONDS=0
usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:-}; shift 2 ;;
        --model-shape) SHAPE=${2:-}; shift 2 ;;
        --budget) BUDGET=${2:-}; shift 2 ;;
        --skip-tests) SKIP_TESTS=1; shift ;;
        --benches) BENCHES=${2:-}; shift 2 ;;
        --suite) SUITE=${2:-}; shift 2 ;;
        --world) WORLD_SECONDS=${2:-}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in gpu|cpu) ;; *) echo "gpu_check.sh: --device must be gpu or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
case "$SHAPE" in
    tiny|50m|1b) ;;
    *) echo "gpu_check.sh: --model-shape must be tiny, 50m or 1b, got '$SHAPE'" >&2; exit 2 ;;
esac
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
case "$WORLD_SECONDS" in
    ''|0?*|*[!0-9]*) echo "gpu_check.sh: --world must be whole seconds, got '$WORLD_SECONDS'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/emojax-gpu-check.XXXXXX")}
mkdir -p "$OUT" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/emojax-gpu-check-work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/nobeam/apache_beam"
cat >"$WORK/nobeam/apache_beam/__init__.py" <<'EOF'
raise ModuleNotFoundError("apache_beam is blocked by scripts/gpu_check.sh (the GPU image has none)",
                          name="apache_beam")
EOF
export PYTHONPATH="$WORK/nobeam:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ "$DEVICE" = cpu ] && export JAX_PLATFORMS=cpu

# bf16 parity on every family; the sharded path on one device of the default backend; nothing recompiles in
# the decode loop for new values; steering semantics (tests/conftest.py: EMOJAX_TEST_PLATFORMS).
TESTS=(
    tests/test_parity.py::test_bfloat16_logits_match_float32_reference
    tests/test_sharding.py::test_one_device_of_the_default_backend_matches_a_cpu_mesh
    tests/test_decode.py::test_nothing_recompiles_for_new_values_in_the_same_bucket
    tests/test_steering.py
    tests/test_attention.py
)

START=$SECONDS
FAILED=()
left() { echo $((BUDGET - (SECONDS - START))); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
notice() { echo "gpu_check.sh: NOTICE: $*"; }
# step NAME TIMEOUT LOG COMMAND...: runs COMMAND under `timeout`, its output shown and written to LOG.
step() {
    local name=$1 limit=$2 logfile=$3 rc
    shift 3
    echo "== $name (timeout ${limit}s, $(left)s of ${BUDGET}s left)"
    if [ "$limit" -lt 5 ]; then
        echo "gpu_check.sh: FAILED $name: not started, the budget of ${BUDGET}s is spent"
        FAILED+=("$name (not started: budget spent)"); return
    fi
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$logfile"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "gpu_check.sh: FAILED $name: timed out after ${limit}s"; FAILED+=("$name (timed out after ${limit}s)")
    elif [ "$rc" -ne 0 ]; then
        echo "gpu_check.sh: FAILED $name: exit status $rc"; FAILED+=("$name (exit status $rc)")
    fi
}

echo "gpu_check.sh: --device $DEVICE --model-shape $SHAPE --budget $BUDGET, python $PY, OUT=$OUT"
{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    if [ "$DEVICE" = gpu ]; then
        if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
    else
        notice "--device cpu: nvidia-smi and the GPU backend checks are skipped"
    fi
} 2>&1 | tee "$OUT/versions.txt"
step versions "$(cap 60)" "$WORK/versions.txt" "$PY" - "$DEVICE" <<'EOF'
import importlib.metadata as md
import platform
import sys

device = sys.argv[1]
print(f"python {platform.python_version()} ({sys.executable})")
dists = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "torch", "transformers", "numpy",
         "pytest"]
dists += sorted({d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").startswith("jax-cuda")})
for name in dists:
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} NOT INSTALLED")
import jax  # noqa: E402
import torch  # noqa: E402

print(f"jax backend {jax.default_backend()}, devices {jax.devices()}")
cuda = torch.cuda.is_available()
print(f"torch cuda {cuda} (CUDA {torch.version.cuda})" + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
if device == "gpu":
    problems = [p for p, bad in (("jax's default backend is not gpu", jax.default_backend() != "gpu"),
                                 ("torch sees no CUDA device", not cuda)) if bad]
    if problems:
        sys.exit("gpu_check.sh: " + "; ".join(problems))
EOF
cat "$WORK/versions.txt" >>"$OUT/versions.txt"

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('emojax.kernels') is None)" 2>/dev/null; then
    step install "$(cap 60)" "$WORK/install.log" "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi

if [ "$SKIP_TESTS" = 1 ]; then
    notice "--skip-tests: the tests are not run"
elif [ "$DEVICE" = gpu ]; then
    # The default suite on this machine's CPU (its jax may be newer than CI's), in the background while the GPU
    # runs its tests and the kernels; it must end before the benches, which it would slow down. Beam is blocked
    # here, so the corpus pipeline's tests fail by design; every other failure is a finding.
    SUITE_LIMIT=$(cap $((BUDGET * 1 / 4)))
    if "$PY" -c "import xdist" 2>/dev/null; then
        echo "== cpu-suite in the background (timeout ${SUITE_LIMIT}s)"
        # shellcheck disable=SC2086  # --suite is a list of paths
        timeout -k 10 "$SUITE_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -n 8 --deselect tests/test_bench.py \
            $SUITE >"$OUT/cpu_suite.txt" 2>&1 &
        SUITE_PID=$!
    else
        notice "no pytest-xdist: the default suite is not run on this machine's CPU"
    fi
    step tests "$(cap $((BUDGET * 1 / 4)))" "$OUT/pytest.txt" \
        env EMOJAX_TEST_PLATFORMS=cuda,cpu "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
else
    notice "--device cpu: the tests are only collected (the default suite runs them on CPU; here they run on a GPU)"
    step tests "$(cap 90)" "$OUT/pytest.txt" "$PY" -m pytest -q -p no:cacheprovider --collect-only "${TESTS[@]}"
fi

# The kernels' first run on a real backend is also their correctness check (errors against the reference).
if [ "$DEVICE" = gpu ]; then KERNEL_ARGS=(--device gpu --rounds 2); else KERNEL_ARGS=(--device cpu --iters 1 --rounds 1); fi
step kernels "$(cap 45)" "$WORK/kernels.log" "$PY" scripts/bench_kernels.py "${KERNEL_ARGS[@]}"
grep '^{' "$WORK/kernels.log" >"$OUT/kernels.jsonl"

if [ -n "${SUITE_PID:-}" ]; then
    wait "$SUITE_PID"
    rc=$?
    tail -n 40 "$OUT/cpu_suite.txt"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "gpu_check.sh: FAILED cpu-suite: timed out after ${SUITE_LIMIT}s"; FAILED+=("cpu-suite (timed out)")
    elif [ "$rc" -ne 0 ]; then
        echo "gpu_check.sh: FAILED cpu-suite: exit status $rc"; FAILED+=("cpu-suite (exit status $rc)")
    fi
fi

# On a GPU the attention comparison and the gathered SAE decoder keep ~185 s at the end; decode first, the
# figure with the GPU target.
RESERVE=0
[ "$DEVICE" = gpu ] && RESERVE=185
# --world keeps its seconds and ~200 s (documents, calibration, diagnostics) for the last step.
[ "$WORLD_SECONDS" -gt 0 ] && RESERVE=$((RESERVE + WORLD_SECONDS + 200))
BENCH_LIMIT=$(($(left) - 5 - RESERVE))
step bench "$BENCH_LIMIT" "$OUT/bench.log" "$PY" scripts/bench.py --device "$DEVICE" --model-shape "$SHAPE" \
    --only "$BENCHES" --out "$OUT/bench.jsonl" --budget $((BENCH_LIMIT - 10))

# The forward with emojax's blocked attention vs cuDNN's fused kernel (--attention, emojax/models/layers.py):
# the default stays "xla" until this shows cuDNN faster. Only on a GPU, and only with the time that is left.
if [ "$DEVICE" = gpu ] && [ "$(left)" -ge 40 ]; then
    for impl in xla cudnn; do
        step "forward-attention-$impl" "$(cap 70)" "$WORK/attention-$impl.log" \
            "$PY" scripts/bench_forward.py --device gpu --attention "$impl" --model-shape "$SHAPE" \
            --iters 5 --rounds 1
        grep '^{' "$WORK/attention-$impl.log" >>"$OUT/attention.jsonl"
    done
else
    notice "the attention comparison (xla vs cudnn) runs only on a GPU with >= 40 s of the budget left"
fi

# The SAE step with the gathered decoder (the CPU default) on the GPU, against bench.jsonl's dense one: whether
# sae.decoder "auto" should gather there too. Only on a GPU, and only with the time that is left.
if [ "$DEVICE" = gpu ] && [ "$(left)" -ge 30 ]; then
    step sae-gather "$(cap 45)" "$WORK/sae-gather.log" "$PY" scripts/bench_sae.py --device gpu --decoder gather \
        --rounds 2
    grep '^{' "$WORK/sae-gather.log" >"$OUT/sae_gather.jsonl"
else
    notice "the gathered SAE decoder runs only on a GPU with >= 30 s of the budget left"
fi

if [ "$WORLD_SECONDS" -gt 0 ]; then
    WORLD_ARGS=(--seconds "$WORLD_SECONDS")
    [ "$DEVICE" = cpu ] && WORLD_ARGS+=(--d-model 64 --layers 2 --batch 4 --documents 2000 --calib-steps 30)
    step world "$(cap $((WORLD_SECONDS + 200)))" "$WORK/world.log" env OUT="$OUT/world" PYTHON="$PY" \
        scripts/world_scale.sh "${WORLD_ARGS[@]}"
fi

echo "== gpu_check.sh: $((SECONDS - START))s of ${BUDGET}s; results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'gpu_check.sh: FAILED %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check.sh: all steps passed"
