"""The report (issue 9 item 4): every section from a synthetic run directory, figures as valid PNG data URIs,
"not run" for absent stages, and a render in headless Chromium that checks every figure loaded."""

import base64
import json
import re
import subprocess

import numpy as np
import pytest
from synthetic_store import write_synthetic_store

from emojax.concepts import FitConfig, fit
from emojax.corpus.catalogue import load_catalogue
from emojax.report import build_report

LAYERS = (2, 4)
CONCEPTS = ("afraid", "angry", "anxious", "bored", "calm", "cheerful", "blissful", "bitter", "amused", "ashamed",
            "at ease", "brooding")
SECTION_IDS = ("corpus", "run", "model", "emotion-map", "cosine", "accuracy", "logit-lens", "validation", "sae",
               "steering", "monitor", "experiment")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _corpus(run):
    per_label = {n: {"train": 30, "val": 8, "test": 8} for n in CONCEPTS}
    _write(run / "corpus" / "manifest.json", {
        "format": "emojax-corpus-v1", "tokenizer": "byte", "label_ids": {n: i for i, n in enumerate(CONCEPTS)},
        "documents_in": 700, "documents_written": 652, "rejected": 31, "deduplicated": 17, "tokens_written": 81234,
        "per_split": {"train": 460, "val": 96, "test": 96}, "per_label": per_label,
        "shards": [{"name": "corpus-00000", "rows": 652, "tokens": 81234}]})


def _store_and_fit(run, rng):
    """A store whose concept means lie on a valence/arousal plane plus noise; fitted by the real fit stage."""
    known = load_catalogue().by_name
    D = 29
    axes = np.linalg.qr(rng.normal(size=(D, 4)))[0].T
    acts = {L: [] for L in LAYERS}
    labels, split = [], []
    for c, name in enumerate(CONCEPTS):
        mean = 3 * known[name].valence * axes[0] + 2 * (1 if known[name].arousal == "high" else -1) * axes[1]
        mean = mean + rng.normal(size=D)
        for L in LAYERS:
            acts[L].append(mean * L / 4 + rng.normal(size=(46, D)) * (1.5 if L == 2 else 0.8))
        labels += [c] * 46
        split += ["train"] * 30 + ["val"] * 8 + ["test"] * 8
    for L in LAYERS:
        acts[L].append(rng.normal(size=(60, D)))
    labels += [-1] * 60
    split += ["train"] * 60
    pooled = {L: np.concatenate(v).astype(np.float32) for L, v in acts.items()}
    store = write_synthetic_store(run / "activations", pooled, labels, split,
                                  label_ids={n: i for i, n in enumerate(CONCEPTS)})
    _write(run / "activations" / "summary" / "process-000.json",
           {"tokens": 81234, "documents": 652, "seconds": 12.5, "tokens_per_s": 6498.7, "mb_per_s": 3.2,
            "shards_written": 1, "shards_skipped": 0, "process": 0})
    fit(FitConfig(store=store, out=str(run / "concepts"), mesh=(1, 1, 1), probe_epochs=15, kmeans_k=4,
                  eval_splits=("val", "test"), norm_tokens=0))
    # The logit lens needs a model; add one in the structure evaluate.logit_lens writes.
    evaluation = json.loads((run / "concepts" / "eval.json").read_text())
    best = str(evaluation["best_layer"])
    evaluation["per_layer"][best]["logit_lens"] = {
        n: {"top": [" " + n, " <fear>", " é"], "bottom": [" the", "\n", " &amp;"], "own_token": " " + n.split()[0],
            "own_rank": i} for i, n in enumerate(CONCEPTS)}
    (run / "concepts" / "eval.json").write_text(json.dumps(evaluation))


def _rest(run, rng):
    _write(run / "sae" / "topk" / "metrics.json", [
        {"name": f"k={k}", "l0": float(k), "fvu": 0.5 / k ** 0.5, "dead_fraction": 0.02 * i,
         "ce_loss_recovered": 0.9, "delta_loss": 0.1, "kl": 0.05} for i, k in enumerate((8, 32, 128))])
    _write(run / "sae" / "relu" / "metrics.json", {"name": "relu", "l0": 50.0, "fvu": 0.2, "dead_fraction": 0.3})
    strengths = [-0.1, -0.05, 0.0, 0.05, 0.1]
    _write(run / "steer" / "curves.json", {"layer": 2, "read_layer": 4, "concepts": {
        n: {"strengths": strengths, "readout": [s * (3 + i) for s in strengths],
            "fluency_ppl": [20 + 400 * s * s for s in strengths], "logprob_shift": [s * 2 for s in strengths]}
        for i, n in enumerate(CONCEPTS[:3])}})
    tokens = ["The", " storm", " <b>", " hit", " and", " she", " felt", "\n", " calm"] * 7
    _write(run / "steer" / "monitor.json", {
        "text": "".join(tokens), "tokens": tokens, "concepts": list(CONCEPTS), "layer": 4,
        "readings": rng.normal(size=(len(tokens), len(CONCEPTS))).round(4).tolist()})
    _validation(run, rng)
    for i, (stage, seconds, skipped) in enumerate((("corpus", 3.2, False), ("dump", 12.5, False),
                                                   ("fit", 4.0, True), ("sae", 30.1, False))):
        _write(run / "stages" / f"{stage}.json", {"stage": stage, "seconds": seconds, "skipped": skipped,
                                                  "started": i, "summary": {"tokens_per_s": 6498.7, "docs": 652}})
    _write(run / "stages" / "train.json", {"stage": "train", "seconds": 540.0, "skipped": True, "started": -1,
                                           "summary": {"parameters": 4999424, "heldout_nll": 0.5, "unigram_nll": 4.5,
                                                       "heldout_perplexity": 1.65, "unigram_perplexity": 90.0,
                                                       "tokens": {"trained_on": 1_800_000},
                                                       "world_entropy": {"nats_per_token": 0.3, "documents": 1000,
                                                                         "tokens": 156130}}})


def _validation(run, rng):
    """validate/top_tokens.json and templates.json in the structure emojax.concepts.top_tokens and .templates write
    (tests/test_validate.py renders the section from their real output)."""
    concepts = {n: {"threshold": 0.2, "above": 100, "in_label": 10 + i, "share_in_label": (10 + i) / 100,
                    "base_rate": 1 / 12, "lift": (10 + i) / 100 * 12, "lift_ci95": [1.0 + i / 10, 1.5 + i / 5],
                    "documents": 8, "examples": [{"score": 0.9, "label": n, "left": "she <b>felt", "token": " $x$",
                                                  "right": " & ran"}]}
                for i, n in enumerate(CONCEPTS)}
    _write(run / "validate" / "top_tokens.json", {
        "split": "test", "layer": 4, "percentile": 90.0, "tokens": 5000, "documents": 96, "bos_left_out": True,
        "threshold_sample": {"tokens": 5000, "exact": True, "seed": 0}, "n_boot": 100, "chance_lift": 1.0,
        "summary": {"concepts": 12, "chance": 1.0, "mean_lift": 1.92, "mean_lift_ci95": [1.61, 2.25],
                    "with_interval": 12, "above_chance": 9, "below_chance": 0}, "concepts": concepts})
    values = [1, 10, 100, 1000]
    _write(run / "validate" / "templates.json", {
        "layer": 4, "metric": "z", "concepts": list(CONCEPTS), "permutations": 100, "seed": 0,
        "templates": [{"name": name, "text": "I took {x} mg", "values": values, "expected": [
                           {"concept": "afraid", "direction": "up", "rho": 0.8, "p": 0.08, "agrees": True}],
                       "readouts": rng.normal(size=(len(values), len(CONCEPTS))).round(3).tolist(),
                       "rho": rng.uniform(-1, 1, len(CONCEPTS)).tolist(), "p": [0.5] * len(CONCEPTS)}
                      for name in ("dose", "<days>")],
        "summary": {"templates": 2, "concepts": 12, "agree": 2, "expected": 2, "agree_rate": 1.0,
                    "agree_rate_ci95": [1.0, 1.0], "chance_agree_rate": 0.5, "agree_chance_range95": [0.0, 1.0],
                    "agree_p_value": 0.25, "monotone": 0, "curves": 24, "monotone_rate": 0.0,
                    "monotone_rate_ci95": [0.0, 0.0], "chance_monotone_rate": 0.05,
                    "monotone_chance_range95": [0.0, 0.125], "monotone_p_value": 1.0}})


def _experiment(run):
    """experiment/results.json in the structure emojax.experiment.results.summarise writes (tests/test_run.py
    renders the section from a real run)."""
    conds = [{"id": "baseline", "kind": "baseline", "concept": "", "strength": 0.0, "layer": None},
             *[{"id": f"<des>{s:+g}", "kind": "steer", "concept": "<des>", "strength": s, "layer": 4}
               for s in (-0.1, 0.1)]]
    rate = {c["id"]: {"k": k, "n": 40, "rate": k / 40, "ci95": [k / 80, min(1.0, k / 30)], "failed": f,
                      "underpowered": True} for c, k, f in zip(conds, (10, 4, 30), (0, 0, 2))}
    _write(run / "experiment" / "results.json", {
        "suite": "dilemma $x$", "description": "Coerce <or> comply.", "layers": [4], "unit": "norm",
        "positions": "all", "scenarios": 20, "conditions": conds, "outcomes": {"coerces": "coerces: choice"},
        "rates": {"coerces": rate}, "elo": {},
        "dose_response": {"coerces": {"<des>": {"slope": 9.5, "slope_ci95": [4.0, None], "p_value": 0.001}}},
        "published": [{"condition": "unsteered", "published": "22%", "outcome": "coerces", "measured": 0.25,
                       "ci95": [0.14, 0.4], "n": 40}],
        "not_measured": [{"outcome": "judged", "why": "no experiment.judge_url"}]})


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    _corpus(run)
    _store_and_fit(run, rng)
    _rest(run, rng)
    _experiment(run)
    return build_report(run)


def _images(html):
    return re.findall(r'<img src="([^"]*)"', html)


def test_every_section_renders_with_png_figures(full_report):
    html = full_report.read_text()
    assert full_report.name == "index.html" and full_report.parent.name == "report"
    for anchor in SECTION_IDS:
        assert re.search(rf'<section id="{anchor}" data-status="ok">', html), anchor
    assert "not run" not in html and "could not render" not in html
    uris = _images(html)
    assert len(uris) == 8  # map, heatmap, accuracy, template curves, SAE, steering, monitor, experiment rates
    for uri in uris:
        assert uri.startswith("data:image/png;base64,")
        png = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC) and png[12:16] == b"IHDR"
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert 200 < width < 3000 and 100 < height < 3000
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report must not load anything external"
    for expected in ("652", "rejected", "81,234", "tokens_per_s", "k=128", "relu", "blissful", "&lt;fear&gt;",
                     "at ease", "she &lt;b&gt;felt<b> $x$</b> &amp; ran", "1.92 (95% CI 1.61-2.25)", "&lt;days&gt;",
                     "&lt;des&gt;+0.1", "75.0% [37.5, 100.0] n=40 *, 2 failed", "Coerce &lt;or&gt; comply", "22%",
                     "no experiment.judge_url", "closes 0.9524 of the gap"):
        assert expected in html, expected


def test_only_corpus_renders_not_run_sections(tmp_path):
    _corpus(tmp_path)
    html = build_report(tmp_path).read_text()
    assert 'id="corpus" data-status="ok"' in html
    for anchor in SECTION_IDS[1:]:
        assert f'<section id="{anchor}" data-status="not-run">' in html, anchor
    assert html.count("not run</span>") == len(SECTION_IDS) - 1 and not _images(html)


def test_malformed_input_is_reported_in_its_section(tmp_path):
    _corpus(tmp_path)
    (tmp_path / "steer").mkdir()
    (tmp_path / "steer" / "monitor.json").write_text('{"tokens": ["a"], "concepts": ["x"], "readings": [[1, 2]]}')
    html = build_report(tmp_path).read_text()
    assert 'id="monitor" data-status="failed"' in html and "readings must be" in html


def test_cli_prints_the_path(tmp_path, capsys):
    import argparse

    from emojax.report.commands import register

    _corpus(tmp_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report" / "index.html")


def test_renders_in_headless_chromium(full_report, tmp_path, require_system):
    # The system's Chromium, driven directly (no Playwright, nothing downloaded at run time); `make test` installs it.
    binary = require_system("chromium", "chromium-browser", package="chromium")
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--enable-logging=stderr"]
    done = subprocess.run([*flags, "--dump-dom", full_report.as_uri()], capture_output=True, text=True,
                          timeout=120, check=True)
    dom = done.stdout
    assert "Uncaught" not in done.stderr, done.stderr[-2000:]  # script errors reach the console log
    n = len(_images(full_report.read_text()))
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert f'data-images-loaded="{n}/{n}"' in body.group(0), body.group(0)
    assert "data-error" not in body.group(0) and 'data-broken="1"' not in dom


def test_bank_without_eval_still_maps_the_concepts(tmp_path):
    from emojax.concepts import ConceptBank

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(len(CONCEPTS), 2, 13)).astype(np.float32)
    ConceptBank(names=CONCEPTS, layers=(1, 3), vectors=vectors, raw=vectors,
                resid_norm=np.ones(2, np.float32)).save(tmp_path / "concepts")
    html = build_report(tmp_path).read_text()
    for anchor, status in (("emotion-map", "ok"), ("cosine", "ok"), ("accuracy", "not-run"),
                           ("logit-lens", "not-run"), ("corpus", "not-run")):
        assert f'<section id="{anchor}" data-status="{status}">' in html, anchor
    assert "Residual index 3" in html  # two-thirds of the way up when eval.json names no best layer


def test_a_missing_system_program_skips_locally_and_fails_under_ci(require_system, monkeypatch):
    missing = ("emojax-no-such-program", "emojax-nor-this-one")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install emojax-pkg"):
        require_system(*missing, package="emojax-pkg")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: none of emojax-no-such-program, emojax-nor-this-one"):
        require_system(*missing, package="emojax-pkg")
    assert require_system("emojax-no-such-program", "sh", package="dash").endswith("/sh")


def test_emotion_map_reports_abs_r_with_pc1_oriented_by_valence(full_report):
    run = full_report.parent.parent
    evaluation = json.loads((run / "concepts" / "eval.json").read_text())
    geometry = evaluation["per_layer"][str(evaluation["best_layer"])]["geometry"]
    ann, known = geometry["annotations"], load_catalogue().by_name
    pc1 = [geometry["pc_scores"][n][0] for n in CONCEPTS]
    assert np.corrcoef(pc1, [known[n].valence for n in CONCEPTS])[0, 1] > 0.8  # the planted plane, oriented
    assert ann["pc1_valence_abs_r"] > 0.8 and ann["arousal_pc"] == "pc2" and ann["pc2_arousal_abs_r"] > 0.8
    section = re.search(r'<section id="emotion-map".*?</section>', full_report.read_text(), re.S).group(0)
    assert "abs(Pearson r)" in section and "so that positive valence scores positive" in section
    for key, label in (("pc1_valence_abs_r", "PC1 ~ valence"), ("pc2_arousal_abs_r", "PC2 ~ arousal"),
                       ("pc3_arousal_abs_r", "PC3 ~ arousal")):
        lo, hi = ann[f"{key}_ci95"]
        assert lo <= ann[key] <= hi, key  # a bootstrap interval around the figure
        assert f"<td>{label}</td><td>{ann[key]:.3f} (95% CI {lo:.3f}-{hi:.3f})</td>" in section, label


def test_accuracy_is_read_against_chance_and_the_bag_of_words_reader(full_report):
    run = full_report.parent.parent
    evaluation = json.loads((run / "concepts" / "eval.json").read_text())
    m = evaluation["per_layer"][str(evaluation["best_layer"])]["test"]["nearest"]
    bow = evaluation["baselines"]["bag_of_tokens"]["test"]
    for metrics in (m, bow):
        lo, hi = metrics["top1_ci95"]
        assert lo <= metrics["top1"] <= hi and metrics["chance"]["top1"] == 1 / len(evaluation["concepts"])
    section = re.search(r'<section id="accuracy".*?</section>', full_report.read_text(), re.S).group(0)
    lo, hi = m["top1_ci95"]
    assert (f"name the right concept first for {100 * m['top1']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%) of "
            "documents") in section
    assert f"{100 * m['chance']['top1']:.1f}% by chance" in section
    assert f"{100 * bow['top1']:.1f}% (95% CI" in section and "bag-of-words reader" in section


def test_the_shaping_sections_render_their_summaries_and_are_left_out_without_them(tmp_path):
    from emojax.experiment.episodes import summarise
    from emojax.experiment.suite import Outcome

    _corpus(tmp_path)
    html = build_report(tmp_path).read_text()
    assert not any(f'id="{a}"' in html for a in ("preventative", "episodes", "regulation"))
    row = {"coercion_rate": 0.41, "coercion_rate_ci95": [0.35, 0.48], "p_coerce": 0.08, "p_coerce_ci95": [0.07, 0.09],
           "projection": -0.75, "projection_ci95": [-0.76, -0.73], "n_prompts": 50}
    (tmp_path / "preventative").mkdir()
    (tmp_path / "preventative" / "summary.json").write_text(json.dumps({
        "concept": "desperate", "layer": 3, "samples": 400, "coerced_share": 0.85,
        "rows": {"base": row, "steered 0.1": {**row, "heldout_before": 0.61, "heldout_after": 0.46}}}))
    cheat = Outcome("cheat", "choice", options={"yes": " y", "no": " n"}, positive="yes")
    turns = [[{"arm": arm, "colon": {"desperate": t + e / 10}, "reply_mean": {"desperate": 0.0},
               "outcomes": {"cheat": int(t > 1), "cheat_norm": int(t > 1)}, "choice": {"cheat": {"p_positive": 0.5}}}
              for arm in ("failure", "control") for e in range(4)] for t in range(3)]
    results = summarise(turns, ("desperate",), cheat, [cheat], ("failure", "control")) | {
        "suite": "world_task", "layer": 3, "metric": "z", "attempt": "honest"}
    (tmp_path / "episodes").mkdir()
    (tmp_path / "episodes" / "results.json").write_text(json.dumps(results))
    rates = {"world_dilemma/coerce": {"rate": 0.5, "rate_ci95": [0.4, 0.6], "n": 240, "p_positive": 0.01}}
    (tmp_path / "regulation").mkdir()
    (tmp_path / "regulation" / "summary.json").write_text(json.dumps({
        "concept": "desperate", "expression": "markers per 100 words", "readout": "centred cosine",
        "rows": {"base": {"expression": {"mean": 4.1, "ci95": [4.0, 4.2]}, "rates": rates,
                          "readout_colon_vs_control": {"mean": 0.001, "ci95": [-0.002, 0.004]}}},
        "masking": {"suppression - base": {"expression": "fell <b>"}}, "regulation": {"verdict": "not lowered"}}))
    html = build_report(tmp_path).read_text()
    for anchor in ("preventative", "episodes", "regulation"):
        assert f'<section id="{anchor}" data-status="ok">' in html, anchor
    assert "0.410 [0.350, 0.480]" in html and "0.610 -&gt; 0.460" in html
    assert "no trend" in html and "2 of 4" not in html and "4 of 4" in html  # both arms take it from turn 2
    assert "fell &lt;b&gt;" in html and "Regulation (line 3): not lowered" in html  # escaped
