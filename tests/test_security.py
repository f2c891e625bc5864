"""Issue 16 (10) and the report's part of (9): a run directory or a checkpoint folder may come from someone else.

The report escapes every value it places in the page and draws user text literally in its figures; a sharded
checkpoint's index may only name files inside its own folder; the report and the weights are written atomically,
and a full disk is one clear error after which a rerun completes.
"""

import errno
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
from matplotlib.text import Text

from emojax.cli import main as cli_main
from emojax.errors import CheckpointError
from emojax.fileio import DiskFullError
from emojax.models import checkpoint
from emojax.report import build_report, figures, markup
from emojax.report.build import SCRIPT, script_text

# Closes an attribute value (either quote), closes the tag, opens a script and an event handler, and holds
# mathtext that matplotlib cannot parse (so a figure drawing it with math on fails).
EVIL = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>$\\undefinedcommand$"
SECTION_IDS = ("corpus", "run", "emotion-map", "cosine", "accuracy", "logit-lens", "sae", "steering", "monitor")
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "nav", "a", "section",
             "span", "div", "table", "thead", "tbody", "tr", "th", "td", "details", "summary", "img", "code",
             "blockquote", "script"}
PAGE_ATTRS = {"lang", "charset", "name", "content", "class", "href", "id", "data-status", "src", "alt"}


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _evil_run(run: Path) -> list[str]:
    """A run directory whose every free-text field holds EVIL (concept names made distinct by a suffix); no fit or
    store is run: eval.json carries the geometry the concept sections draw."""
    names = [f"{EVIL}{i}" for i in range(4)]
    _write(run / "corpus" / "manifest.json", {
        "documents_in": 9, "documents_written": 8, "rejected": 1, "deduplicated": 0, "tokens_written": 99,
        "tokenizer": EVIL, "per_split": {EVIL: 8}, "per_label": {n: {EVIL: 2} for n in names}, "shards": [{}]})
    _write(run / "activations" / "store.json", {"model": f"/models/{EVIL}", "layers": [1], "d_model": 8,
                                                "dtype": EVIL, "complete": True})
    _write(run / "activations" / "summary" / "process-000.json", {"process": EVIL, "tokens": 99})
    _write(run / "stages" / "dump.json", {"stage": EVIL, "seconds": 1.5, "summary": {EVIL: EVIL}})
    rng = np.random.default_rng(0)
    metrics = {"n": 8, "top1": 0.5, "top5": 1.0, "macro_auroc": 0.75}
    geometry = {"pc_scores": {n: rng.normal(size=2).tolist() for n in names},
                "clusters": {n: i % 2 for i, n in enumerate(names)}, "explained_variance": [0.5, 0.25],
                "cosine": np.eye(4).tolist(), "annotations": {"n_annotated": EVIL, "pc1_valence_abs_r": EVIL}}
    lens = {n: {"top": [EVIL], "bottom": [EVIL], "own_token": EVIL, "own_rank": EVIL} for n in names}
    _write(run / "concepts" / "eval.json", {
        "concepts": names, "best_layer": 1, "method": EVIL, "best_by": EVIL,
        "per_layer": {"1": {"test": {"nearest": metrics, "probe": metrics}, "geometry": geometry,
                            "logit_lens": lens}}})
    _write(run / "sae" / "x" / "metrics.json", [{"name": EVIL, "l0": 4.0, "fvu": 0.3, "dead_fraction": 0.1,
                                                 "kl": EVIL}])
    _write(run / "steer" / "curves.json", {"layer": EVIL, "read_layer": EVIL, "concepts": {
        n: {"strengths": [-1.0, 0.0, 1.0], "readout": [-1.0, 0.0, 1.0], "fluency_ppl": [9.0, 3.0, 9.0]}
        for n in names}})
    tokens = [EVIL, " a", "$", "$x$"]
    _write(run / "steer" / "monitor.json", {"text": EVIL, "tokens": tokens, "concepts": names, "layer": EVIL,
                                            "readings": rng.normal(size=(len(tokens), len(names))).tolist()})
    return names


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text inside each <script>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def test_report_escapes_every_value_from_the_run_directory(tmp_path):
    run = tmp_path / f"run{EVIL.replace('/', '_')}"  # the run folder's name goes into <title> and the header
    _evil_run(run)
    html = build_report(run).read_text()
    for anchor in SECTION_IDS:  # every section drew its figures too: no mathtext error from a "$...$" name
        assert f'<section id="{anchor}" data-status="ok">' in html, anchor
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&quot;&#x27;&gt;" in html  # placed, escaped
    page = _Page()
    page.feed(html)
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    assert {name for _, attrs in page.tags for name in attrs} <= PAGE_ATTRS
    assert page.scripts == [SCRIPT]  # the one script is the report's own
    assert "</" not in script_text(json.dumps({"label": EVIL}))  # JSON or code placed in <script> cannot close it
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 6 and all(a["src"].startswith("data:image/png;base64,") for a in images)


def test_attribute_values_cannot_be_broken_out_of():
    page = _Page()
    page.feed(markup.img(EVIL, EVIL) + markup.table([EVIL], [[EVIL, {EVIL: EVIL}, [EVIL]]], cls=EVIL))
    assert page.tags[0] == ("img", {"src": EVIL, "alt": EVIL})  # both values come back whole: nothing escaped
    assert page.tags[1] == ("table", {"class": EVIL})
    assert [tag for tag, _ in page.tags] == ["img", "table", "thead", "tr", "th", "tbody", "tr", "td", "td", "td"]


def test_figures_draw_dollar_signs_literally():
    for text in ("$x$", "$\\undefinedcommand$", "a $ b $", "\\$1"):
        assert not matplotlib.cbook.is_math_text(figures.literal(text)), text
        assert Text(text=figures.literal(text))._preprocess_math(figures.literal(text)) == (text, False)
    names = ["$\\undefinedcommand$", "$x$", "plain"]
    scores = np.arange(6, dtype=float).reshape(3, 2)
    figures.emotion_map(names, scores, [None, 0.5, -0.5], [0.5, 0.2], [0, 1, 0])
    figures.cosine_heatmap(names, np.eye(3), np.arange(3))
    figures.sae_tradeoff([{"name": n, "l0": 4.0, "fvu": 0.2, "dead_fraction": 0.1} for n in names])
    figures.steering_curves({n: {"strengths": [0.0, 1.0], "readout": [0.0, 1.0], "fluency_ppl": [2.0, 3.0]}
                            for n in names})
    figures.monitor_heatmap(names, names, np.eye(3))


# ---- the report on a full disk


def _fill_disk_at(monkeypatch, name: str) -> None:
    """Writes to a file called `name` stop half-way with ENOSPC, as on a full disk."""
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(f".{name}.tmp") or self.name == name:
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_report_on_a_full_disk_keeps_the_old_page_and_a_rerun_completes(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "corpus" / "manifest.json", {"documents_in": 1, "per_label": {"calm": {"train": 1}}})
    index = build_report(tmp_path)
    before = index.read_bytes()
    _write(tmp_path / "sae" / "metrics.json", {"name": "new", "l0": 2.0, "fvu": 0.1, "dead_fraction": 0.0})
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, "index.html")
        with pytest.raises(DiskFullError, match="index.html") as full:
            build_report(tmp_path)
        assert cli_main(["report", str(tmp_path)]) == 2
    assert "\n" not in str(full.value)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.html" in err and "Traceback" not in err
    assert index.read_bytes() == before and sorted(p.name for p in index.parent.iterdir()) == ["index.html"]
    assert 'id="sae" data-status="ok"' in build_report(tmp_path).read_text()  # the rerun, with space again


# ---- checkpoint folders


def _sharded(folder: Path, weight_map: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-1.safetensors").write_bytes(b"")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "link.safetensors", 7, ""])
def test_index_may_only_name_files_inside_its_folder(tmp_path, entry):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    folder = tmp_path / "ckpt"
    index = _sharded(folder, {"model.embed.weight": "model-1.safetensors", "lm_head.weight": entry})
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError) as refused:
        checkpoint.weight_files(folder)
    message = str(refused.value)
    assert message.startswith(f"{index}: entry 'lm_head.weight' -> {entry!r}") and "\n" not in message


def test_index_naming_files_inside_its_folder_loads(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "model-2.safetensors").write_bytes(b"")
    (folder / "alias.safetensors").symlink_to(folder / "sub" / "model-2.safetensors")  # a symlink kept inside
    _sharded(folder, {"a": "model-1.safetensors", "b": "./sub/model-2.safetensors", "c": "alias.safetensors"})
    assert [p.name for p in checkpoint.weight_files(folder)] == ["alias.safetensors", "model-1.safetensors",
                                                                  "model-2.safetensors"]


def test_index_in_a_hugging_face_hub_snapshot_may_point_into_its_blobs(tmp_path):
    """The hub cache keeps each file once under blobs/ and links it from every snapshot that has it."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model-2.safetensors").symlink_to(Path("..", "..", "blobs", "abc123"))
    _sharded(snapshot, {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    assert [p.name for p in checkpoint.weight_files(snapshot)] == ["model-1.safetensors", "model-2.safetensors"]
    (tmp_path / "elsewhere").write_bytes(b"")
    (snapshot / "model-3.safetensors").symlink_to(tmp_path / "elsewhere")  # out of the repository: refused
    _sharded(snapshot, {"a": "model-1.safetensors", "c": "model-3.safetensors"})
    with pytest.raises(CheckpointError, match="'c' -> 'model-3.safetensors' resolves to"):
        checkpoint.weight_files(snapshot)


def test_weights_are_saved_atomically_and_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    monkeypatch.setattr(checkpoint, "iter_hf_tensors", lambda cfg, state: iter(tensors.items()))
    path = checkpoint.save_safetensors(None, None, tmp_path)
    before = path.read_bytes()
    with checkpoint.SafetensorsReader([path]) as reader:
        np.testing.assert_array_equal(reader.get("w"), tensors["w"])

    def full(tensors, filename, metadata=None):  # what safetensors raises (not an OSError) on ENOSPC
        Path(filename).write_bytes(b"half")
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    tensors = {"w": np.zeros((2, 3), np.float32)}
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(DiskFullError, match="model.safetensors"):
        checkpoint.save_safetensors(None, None, tmp_path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
