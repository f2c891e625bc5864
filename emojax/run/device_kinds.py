"""What `emojax plan` knows about machines: memory per device of each device kind, and the measured benchmark
figures its time estimates are scaled from (each with the line of PERFORMANCE.md it comes from).

Only two machines were ever measured (the 2-core CPU VM and one H100). Every other accelerator's throughput is
the H100 figure times the ratio of published dense bf16 peaks: a rough guess, and labelled as one.
"""

from __future__ import annotations

import dataclasses

from emojax.errors import ConfigError

GB, GIB = 10**9, 2**30


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    name: str
    memory_bytes: int  # per device (for cpu: the host's RAM)
    devices_per_host: int  # devices one process sees; dump.mesh and sae.mesh are per process
    peak_tflops: float  # published dense bf16 peak per device; only ratios between kinds are used
    measured: str  # the measured kind whose benchmark figures are scaled: "cpu" or "h100"
    about: str


DEVICE_KINDS: dict[str, DeviceKind] = {k.name: k for k in (
    DeviceKind("cpu", 24 * GIB, 1, 0.16, "cpu", "the 2-core development VM of PERFORMANCE.md (24 GiB RAM)"),
    DeviceKind("h100", 80 * GB, 8, 989.0, "h100", "NVIDIA H100 80GB SXM"),
    DeviceKind("h200", 141 * GB, 8, 989.0, "h100", "NVIDIA H200 141GB (H100 compute, more memory)"),
    DeviceKind("a100", 80 * GB, 8, 312.0, "h100", "NVIDIA A100 80GB"),
    DeviceKind("a100-40gb", 40 * GB, 8, 312.0, "h100", "NVIDIA A100 40GB"),
    DeviceKind("l4", 24 * GB, 8, 121.0, "h100", "NVIDIA L4 24GB"),
    DeviceKind("tpu-v4", 32 * GIB, 4, 275.0, "h100", "TPU v4 chip (32 GiB HBM), 4 per host"),
    DeviceKind("tpu-v5e", 16 * GIB, 8, 197.0, "h100", "TPU v5e chip (16 GiB HBM), up to 8 per host"),
    DeviceKind("tpu-v5p", 95 * GIB, 4, 459.0, "h100", "TPU v5p chip (95 GiB HBM), 4 per host"),
    DeviceKind("tpu-v6e", 32 * GIB, 8, 918.0, "h100", "TPU v6e (Trillium) chip (32 GiB HBM), up to 8 per host"),
)}


def device_kind(name: str) -> DeviceKind:
    try:
        return DEVICE_KINDS[name]
    except KeyError:
        raise ConfigError(f"--device {name!r} is not a known device kind; kinds: {', '.join(DEVICE_KINDS)}") from None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One measured throughput. `shape` is a preset of emojax.models.presets (or SAE sizes for the SAE figure);
    `depth` is how many layers the measured forward ran, and `head` whether it included the unembedding."""

    figure: str  # forward | dump | sae | decode_b1 | decode_b32
    device: str  # cpu | h100
    tokens_per_s: float
    shape: str = ""
    depth: int = 0  # 0: every layer
    head: bool = True
    sae_d: int = 0
    sae_latents: int = 0
    source: str = ""
    date: str = "2026-11-27"


_CPU = "PERFORMANCE.md, CPU (2-core EPYC VM, float32)"
_H100 = "PERFORMANCE.md, GPU: one H100 80GB"
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("forward", "cpu", 1_125, "llama-56m", source=f"{_CPU}: forward + hidden states, batch 8 x 256"),
    Benchmark("dump", "cpu", 2_400, "llama-56m", depth=5, head=False,
              source=f"{_CPU}: dump, layer 5 to TensorStore, 60 docs x 512"),
    Benchmark("sae", "cpu", 4_361, sae_d=512, sae_latents=4096,
              source=f"{_CPU}: TopK SAE training, d 512, 4096 latents, k 32, batch 1024"),
    Benchmark("decode_b1", "cpu", 72, "llama-56m", source=f"{_CPU}: steered decode, batch 1"),
    Benchmark("decode_b32", "cpu", 372, "llama-56m", source=f"{_CPU}: steered decode, batch 32"),
    Benchmark("forward", "h100", 94_497, "tinyllama-1.1b",
              source=f"{_H100} (bf16): forward + capture of 2 layers, batch 16 x 1024"),
    # The dump was not measured on the H100; its forward with captures stands in for it.
    Benchmark("dump", "h100", 94_497, "tinyllama-1.1b",
              source=f"{_H100} (bf16): forward + capture of 2 layers, batch 16 x 1024 (dump not measured)"),
    Benchmark("sae", "h100", 243_763, sae_d=2048, sae_latents=32_768,
              source=f"{_H100} (float32): TopK SAE training, d 2048, 32,768 latents, k 32, batch 4096"),
    Benchmark("decode_b1", "h100", 532, "tinyllama-1.1b", source=f"{_H100} (bf16): steered decode, batch 1"),
    Benchmark("decode_b32", "h100", 14_801, "tinyllama-1.1b", source=f"{_H100} (bf16): steered decode, batch 32"),
)


def benchmark(figure: str, kind: DeviceKind) -> Benchmark:
    """The measured figure that estimates for `kind` are scaled from."""
    return next(b for b in BENCHMARKS if b.figure == figure and b.device == kind.measured)


def relative_speed(kind: DeviceKind) -> float:
    """Throughput of one `kind` device relative to the device the benchmark was measured on."""
    return kind.peak_tflops / DEVICE_KINDS[kind.measured].peak_tflops
