"""The command line: commands run end to end; user errors print one line, no traceback."""

import subprocess
import sys


def _emojax(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "emojax.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_init_random_info_and_forward(tmp_path):
    out = tmp_path / "model"
    r = _emojax("init-random", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    r = _emojax("forward", str(out), "--tokens", "1,2,3", "--capture", "0", "2")
    assert r.returncode == 0, r.stderr
    assert "next-token prediction" in r.stdout and "residual index 2" in r.stdout


def test_bad_checkpoint_is_one_line_without_traceback(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, '
                                          '"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}')
    r = _emojax("info", str(tmp_path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("emojax: error:") and "safetensors" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_capture_index_is_a_user_error():
    r = _emojax("forward", "random:tiny", "--tokens", "1,2", "--capture", "7")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "capture indices [7] are outside 0..2" in r.stderr
