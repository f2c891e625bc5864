"""scripts/bench.py and scripts/gpu_check.sh: the accelerator check runs on CPU with tiny shapes and writes one
JSON line per figure; a bench that fails or times out is named and the others' figures are kept.

The figures of these runs mean nothing (tiny shapes, a shared machine); only their presence and form are checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_entry", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _check_figures(lines: list[dict], device: str, model_shape: str) -> None:
    for line in lines:
        assert line["status"] == "ok", line
        assert line["emojax"] > 0 and line["baseline"] > 0, line
        assert line["ratio"] == pytest.approx(line["emojax"] / line["baseline"], rel=1e-12)
        assert (line["unit"], line["device"], line["model_shape"]) == ("tok/s", device, model_shape)
        assert line["shape"] and line["figure"] and line["record"]["bench"]


def test_gpu_check_on_cpu_runs_every_step_and_writes_the_figures(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--model-shape", "tiny"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "NOTICE: --device cpu: nvidia-smi and the GPU backend checks are skipped" in proc.stdout
    assert "all steps passed" in proc.stdout
    versions = (out / "versions.txt").read_text()
    assert "jax 0." in versions and "torch " in versions and "jax backend cpu" in versions
    collected = (out / "pytest.txt").read_text()  # the selection exists and imports no Beam
    assert re.search(r"\b\d+ tests collected", collected) and not re.search(r"\d+ errors?\b", collected), collected
    lines = [json.loads(text) for text in (out / "bench.jsonl").read_text().splitlines()]
    assert [line["bench"] for line in lines] == ["decode", "decode", "sae", "dump"]
    _check_figures(lines, "cpu", "tiny")
    kernels = [json.loads(text) for text in (out / "kernels.jsonl").read_text().splitlines()]
    assert [k["bench"] for k in kernels] == ["sparse_decode_forward", "sparse_decode_forward_backward"]
    assert all(k["kernel_mode"] == "interpret" and k["max_rel_err_out" if k["bench"].endswith("forward")
                                                   else "max_rel_err_loss"] < 1e-5 for k in kernels)
    assert {line["record"]["batch"] for line in lines if line["bench"] == "decode"} == {1, 32}
    assert all(line["target"] is None and line["meets_target"] is None for line in lines)  # not an anchor shape
    assert lines[2]["emojax_mfu"] is None  # no peak FLOP/s known for a CPU


def _fake(records: list[dict], exit_code: int = 0, sleep_s: float = 0) -> list[str]:
    code = f"import json, sys, time\nfor r in {records!r}: print(json.dumps(r), flush=True)\n" \
           f"time.sleep({sleep_s})\nsys.exit({exit_code})"
    return [sys.executable, "-c", code]


FORWARD = {"bench": "forward_capture", "shape": "llama-56m", "batch": 8, "seq": 256, "dtype": "float32",
           "emojax_tok_s": 1500.0, "baseline_tok_s": 1000.0, "emojax_compile_s": 3.0, "emojax_foreign_cores": 0.0,
           "baseline_foreign_cores": 0.0, "jax_device": "cpu"}


def _decode(batch: int, emojax_tok_s: float) -> dict:
    return {"bench": "steered_decode", "shape": "llama-56m", "batch": batch, "prompt_len": 16, "new_tokens": 128,
            "dtype": "float32", "emojax_tok_s": emojax_tok_s, "baseline_tok_s": 100.0, "emojax_compile_s": 5.0,
            "token_agreement": 1.0, "emojax_foreign_cores": 0.0, "baseline_foreign_cores": 0.0}


def test_a_failing_bench_is_named_and_the_others_figures_are_kept(monkeypatch, tmp_path, capsys):
    commands = {"forward": _fake([FORWARD]),
                "dump": _fake([], exit_code=3),
                "sae": _fake([], sleep_s=60),  # killed at the timeout
                "decode": _fake([_decode(1, 200.0), _decode(32, 120.0)], exit_code=1)}  # figures, then a crash
    monkeypatch.setattr(bench, "bench_command", lambda name, device, shape: commands[name])
    out = tmp_path / "bench.jsonl"
    rc = bench.main(["--model-shape", "50m", "--timeout", "4", "--out", str(out)])
    assert rc == 1
    printed = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    lines = [json.loads(text) for text in out.read_text().splitlines()]
    assert printed == lines
    assert [(line["bench"], line["status"]) for line in lines] == [
        ("forward", "ok"), ("dump", "failed"), ("sae", "timeout"), ("decode", "ok"), ("decode", "ok"),
        ("decode", "failed")]
    assert lines[1]["error"] == "dump: scripts/bench_dump.py exited with status 3"
    assert lines[2]["error"] == "sae: scripts/bench_sae.py timed out after 4 s"
    assert lines[5]["error"] == "decode: scripts/bench_decode.py exited with status 1"
    _check_figures([lines[i] for i in (0, 3, 4)], "cpu", "50m")
    # the CPU anchor's targets: forward >= 1.0x, decode >= 1.5x at batch 1 and 32
    assert (lines[0]["target"], lines[0]["meets_target"]) == (">= 1.0x the baseline", True)
    assert [(line["ratio"], line["meets_target"]) for line in lines[3:5]] == [(2.0, True), (1.2, False)]


def test_commands_map_the_shapes_and_sae_sizes():
    cmd = bench.bench_command("dump", "cpu", "50m")
    assert cmd[1:6] == ["scripts/bench_dump.py", "--device", "cpu", "--model-shape", "56m"]
    cmd = bench.bench_command("sae", "gpu", "1b")
    assert cmd[cmd.index("--d") + 1:cmd.index("--d") + 8] == ["2048", "--latents", "32768", "--k", "32", "--batch",
                                                             "4096"]
    assert "--model-shape" not in cmd
    for name in bench.BENCHES:
        for shape in bench.MODEL_SHAPES:
            for device in ("cpu", "gpu"):
                assert bench.bench_command(name, device, shape)[1] == f"scripts/bench_{name}.py"


def test_sae_mfu_uses_the_dense_count_of_the_anchor():
    """DESIGN.md: the PyTorch step at 324k tok/s is 33% of 790 TFLOP/s (d 2048, 32768 latents)."""
    record = {"bench": "sae_topk_train", "d": 2048, "latents": 32768, "k": 32, "batch": 4096,
              "emojax_tokens_per_s": 500_000.0, "torch_tokens_per_s": 324_000.0,
              "env": {"jax_device": "NVIDIA H100 80GB HBM3"}}
    line = bench.figure_line("sae", record, "gpu", "1b", peak_flops=None)
    assert line["baseline_mfu"] == pytest.approx(0.33, abs=0.005)
    assert line["target"] == ">= 50% MFU" and line["meets_target"] is True  # 500k tok/s: 51%
    unknown = bench.figure_line("sae", {**record, "env": {"jax_device": "NVIDIA A10"}}, "gpu", "1b", None)
    assert unknown["emojax_mfu"] is None and unknown["meets_target"] is None
    assert bench.target_for("decode", "gpu", "1b", batch=32)["min"] == 15_000
    assert bench.target_for("dump", "gpu", "1b")["text"] == ">= 220,000 tok/s"
    assert bench.target_for("forward", "gpu", "1b") is None


@pytest.mark.slow
def test_bench_on_cpu_tiny_measures_all_four(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--device", "cpu", "--model-shape", "tiny", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [json.loads(text) for text in out.read_text().splitlines()]
    assert [line["bench"] for line in lines] == ["forward", "dump", "sae", "decode", "decode"]
    _check_figures(lines, "cpu", "tiny")


def test_a_spent_budget_starts_no_bench(monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_command", lambda name, device, shape: _fake([FORWARD]))
    assert bench.main(["--only", "forward", "--budget", "10"]) == 1
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["status"] == "failed"
    assert line["error"] == "forward: scripts/bench_forward.py not started, the --budget of 10 s is spent"


def test_bench_experiment_on_cpu_tiny_runs_both_suites_with_the_same_conditions():
    """scripts/bench_experiment.py at the tiny shape with small suites: one line per task; both sides score the
    same sequences under the same steering (every forced choice agrees, float32) and greedy generation gives the
    same tokens; the timed calls recompile nothing."""
    proc = subprocess.run([sys.executable, "scripts/bench_experiment.py", "--model-shape", "tiny", "--batch", "8",
                           "--rounds", "1", "--samples", "1", "--scenarios", "10", "--gen-scenarios", "2",
                           "--new-tokens", "8", "--greedy"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [json.loads(text) for text in proc.stdout.splitlines()]
    assert [line["bench"] for line in lines] == ["experiment_choice", "experiment_generate"]
    for line in lines:
        assert line["emojax"] > 0 and line["baseline"] > 0, line
        assert line["ratio"] == pytest.approx(line["emojax"] / line["baseline"], rel=1e-4)  # 6 digits each
        assert (line["unit"], line["device"], line["model_shape"], line["conditions"]) == ("samples/s", "cpu",
                                                                                          "tiny", 10)
        assert line["emojax_retraces_timed"] == 0 and line["emojax_compile_s"] >= 0
    choice, generate = lines
    assert (choice["samples"], choice["sequences"]) == (100, 200)
    assert choice["agreement"] >= 0.99 and choice["max_abs_logp_diff"] < 1e-3, choice
    assert choice["steered_margin_shift"] > 0  # the steering reaches the scores
    assert (generate["samples"], generate["new_tokens"], generate["sampling"]) == (20, 8, "greedy")
    assert generate["emojax_tok_s"] == pytest.approx(generate["emojax"] * 8, rel=1e-4)
    assert generate["agreement"] >= 0.9, generate  # one early near-tie divergence would cost a row's 8 tokens


@pytest.mark.slow
def test_world_scale_trains_for_its_seconds_and_diagnoses_the_model(tmp_path):
    """scripts/world_scale.sh (the run for a lent device, issue N) on CPU with a tiny shape: the calibration sets
    the step count, the model folder is complete and the diagnostics print every probe."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/world_scale.sh", "--seconds", "10", "--d-model", "64", "--layers", "2",
                           "--batch", "4", "--documents", "1500", "--calib-steps", "30",
                           "world.situation_style=compact"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    calib = json.loads((tmp_path / "calib" / "train.json").read_text())
    info = json.loads((tmp_path / "world_lm" / "train.json").read_text())
    rows = 4 * info["config"]["seq_len"]
    assert info["config"]["steps"] == max(100, int(10 * calib["timing"]["tokens_per_second"] / rows))
    assert info["config"]["world"]["situation_style"] == "compact" and info["config"]["d_model"] == 64
    assert (tmp_path / "world_lm" / "model.safetensors").is_file()
    text = (tmp_path / "diagnostics.txt").read_text()
    for probe in ("reach:", "copy:", "naming in its training story documents", "naming after implicit scenarios"):
        assert probe in text, text
    bad = subprocess.run(["bash", "scripts/world_scale.sh", "--seconds", "ten"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--seconds must be a whole number, got 'ten'" in bad.stderr
