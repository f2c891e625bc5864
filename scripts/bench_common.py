"""Small helpers shared by the scripts/bench_*.py benchmarks: timing, JSON-line output, environment info.

Every benchmark prints one JSON object per measured figure on stdout (machine-readable) and a human summary
on stderr, so `python scripts/bench_x.py > results.jsonl` collects only the figures.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable


# --model-shape choices of the benches -> emojax.models.presets.SHAPES names
SHAPE_NAMES = {"tiny": "tiny", "56m": "llama-56m", "1b": "tinyllama-1.1b"}


def start_against_torch(device: str, model_shape: str):
    """The start of a bench against PyTorch: JAX on the CPU for device "cpu" (before jax is first imported),
    no downloads, torch and transformers imported (env_info reports them), a CUDA check for device "gpu".
    Returns (the SHAPES name, its ModelConfig)."""
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # must precede the first jax import
    offline()
    import jax
    import torch
    import transformers  # noqa: F401  (imported for env_info)

    from emojax.models.presets import SHAPES

    if device == "gpu":
        if jax.default_backend() != "gpu":
            log(f"warning: --device gpu but jax's default backend is {jax.default_backend()!r}")
        if not torch.cuda.is_available():
            raise SystemExit("--device gpu: torch has no CUDA device")
    shape = SHAPE_NAMES[model_shape]
    return shape, SHAPES[shape]


def offline() -> None:
    """Forbids Hugging Face downloads for the rest of the process (call before importing transformers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def time_fn(fn: Callable[[], object], iters: int, warmup: int = 1) -> dict:
    """Runs `fn` `warmup` times, then `iters` timed times. `fn` must block until its work is done.

    Returns seconds: `first` (the first warmup call: compile + one run for jitted code), `median`, `mean`,
    `min` over the timed calls, and the raw `times`; `output`: what the first timed call returned.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    first = None
    for _ in range(max(warmup, 0)):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        first = dt if first is None else first
    times, outputs = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        outputs.append(fn())
        times.append(time.perf_counter() - t0)
    return {"first": first, "median": statistics.median(times), "mean": statistics.fmean(times),
            "min": min(times), "times": times, "output": outputs[0]}


def _cpu_counters() -> tuple[float, float, float] | None:
    """(wall s, busy CPU-seconds of the whole machine, CPU-seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait (guest is inside user)
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


class ForeignLoad:
    """Measures how many cores *other* processes kept busy while the block ran (0 = a quiet machine).

        with ForeignLoad() as load: ...
        load.cores  # float, or None where /proc/stat is unavailable
    """

    cores: float | None = None

    def __enter__(self):
        self._start = _cpu_counters()
        return self

    def __exit__(self, *exc):
        end = _cpu_counters()
        if self._start and end and end[0] > self._start[0]:
            t0, busy0, own0 = self._start
            t1, busy1, own1 = end
            self.cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        return False


def env_info() -> dict:
    """Versions and machine facts worth keeping next to every figure (only for modules already imported)."""
    info = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "host": platform.node()}
    if "jax" in sys.modules:
        import jax
        info["jax_version"] = jax.__version__
        info["jax_backend"] = jax.default_backend()
        info["jax_device"] = str(jax.devices()[0].device_kind)
    if "torch" in sys.modules:
        import torch
        info["torch_version"] = torch.__version__
        info["threads"] = torch.get_num_threads()
    if "transformers" in sys.modules:
        import transformers
        info["transformers_version"] = transformers.__version__
    return info


def emit(record: dict) -> None:
    """One JSON line on stdout (floats kept to 6 significant digits)."""
    def rnd(v):
        return float(f"{v:.6g}") if isinstance(v, float) else v
    print(json.dumps({k: rnd(v) for k, v in record.items()}), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_rounds(steps: dict[str, Callable[[], object]], iters: int, rounds: int, warmup: int = 1) -> dict:
    """Times the sides alternately, `rounds` times, so slow drift of a shared machine hits both alike: each
    round runs each side `warmup` untimed then `iters` timed calls (`time_fn`). Returns per side the per-round
    timings, each with the cores other processes kept busy meanwhile (`foreign_cores`)."""
    results = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            with ForeignLoad() as load:
                timing = time_fn(step, iters, warmup=warmup)
            results[name].append({**timing, "foreign_cores": load.cores})
    return results
