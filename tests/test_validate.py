"""The study's remaining validations (issue 18): top-activating tokens on held-out text find a planted concept and
not a blank one; numeric templates read a planted direction monotonically, through left padding, at the last
token; bad template files name the file, template and key; both CLI commands run end to end."""

import json

import numpy as np
import pytest
from synthetic_store import write_synthetic_store

from emojax.cli import main
from emojax.concepts.bank import ConceptBank
from emojax.concepts.evaluate import concept_readout
from emojax.concepts.templates import (Template, builtin_templates_file, known_concepts, load_templates,
                                       spearman_monotonicity, template_curves)
from emojax.concepts.top_tokens import lift_statistics, top_activating_tokens
from emojax.errors import ConfigError
from emojax.models import load_model
from emojax.models.lm import tokenizer_for
from emojax.store import ActivationStore, StoreError
from emojax.store.state import KeyValueFolder

LAYER = 2
D = 23
T = 31  # tokens per document
NAMES = ("signal", "blank", "other")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A test split of 24 documents per concept plus 24 neutral ones, token rows N(0, 1); every token of a "signal"
    document carries 1.5 x the signal direction. Bank: signal = that direction, blank and other = directions no
    document carries. Each document's first row is an outlier along "blank", a BOS the store records leaving out."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(D, 3)))[0].T
    labels = np.repeat([0, 1, 2, -1], 24)
    tokens = rng.normal(size=(len(labels), T, D))
    tokens[labels == 0] += 1.5 * q[0]
    tokens[:, 0] = 50.0 * q[1]
    path = write_synthetic_store(tmp_path_factory.mktemp("store") / "store", {LAYER: tokens.mean(1)}, labels,
                                 ["test"] * len(labels), tokens={LAYER: tokens}, label_ids=dict(zip(NAMES, range(3))),
                                 token_chunk_rows=512, token_read_rows=128)
    folder = KeyValueFolder(path)
    state = folder.read_json("store.json")
    state["fingerprints"] = {"capture": {"pooling": {"bos_id_left_out": 256}}}
    folder.write_json("store.json", state)
    vectors = q[:, None, :].astype(np.float32)
    bank = ConceptBank(names=NAMES, layers=(LAYER,), vectors=vectors, raw=vectors, resid_norm=np.ones(1, np.float32),
                       center=np.zeros((1, D), np.float32))
    return ActivationStore(path), bank


def test_top_tokens_lift_a_planted_concept_and_leave_a_blank_one_at_chance(planted):
    store, bank = planted
    result = top_activating_tokens(store, bank, LAYER, "test", examples=4, context=3, n_boot=400,
                                   show_progress=False)
    n_docs = 4 * 24
    assert result["tokens"] == n_docs * (T - 1) and result["bos_left_out"]  # the BOS rows were not read
    assert result["threshold_sample"]["exact"]
    signal, blank = result["concepts"]["signal"], result["concepts"]["blank"]
    for entry in (signal, blank):  # the 90th percentile: a tenth of the tokens above it
        assert abs(entry["above"] / result["tokens"] - 0.1) < 0.002
        assert entry["documents"] == 24 and abs(entry["base_rate"] - 0.25) < 1e-9
    assert signal["lift"] > 3 and signal["lift_ci95"][0] > 1.5, signal
    assert blank["lift_ci95"][0] < 1 < blank["lift_ci95"][1], blank
    assert all(x["label"] == "signal" for x in signal["examples"]) and len(signal["examples"]) == 4
    assert signal["examples"][0]["token"].startswith("<") and signal["examples"][0]["score"] > signal["threshold"]
    summary = result["summary"]
    assert summary["chance"] == 1.0 and summary["concepts"] == 3 and summary["above_chance"] >= 1
    assert summary["mean_lift_ci95"][0] <= summary["mean_lift"] <= summary["mean_lift_ci95"][1]


def test_top_tokens_stream_in_any_chunk_size_and_sample_the_percentile(planted):
    store, bank = planted
    whole = top_activating_tokens(store, bank, LAYER, n_boot=50, chunk_rows=100_000, show_progress=False)
    chunked = top_activating_tokens(store, bank, LAYER, n_boot=50, chunk_rows=37, show_progress=False)
    assert json.dumps(whole) == json.dumps(chunked)
    sampled = top_activating_tokens(store, bank, LAYER, n_boot=50, threshold_tokens=1000, show_progress=False)
    assert not sampled["threshold_sample"]["exact"] and sampled["threshold_sample"]["tokens"] == 1000
    for name in NAMES:
        assert abs(sampled["concepts"][name]["above"] / sampled["tokens"] - 0.1) < 0.03
    with pytest.raises(StoreError, match=r"split 'val' holds no token rows to read; the store's splits are \['test'\]"):
        top_activating_tokens(store, bank, LAYER, split="val", show_progress=False)


def test_lift_statistics_on_known_counts():
    # four documents of ten tokens: concept 0 owns documents 0 and 1, concept 1 document 2, document 3 is neutral
    above = np.array([[5, 2], [5, 2], [0, 2], [0, 2]])
    result = lift_statistics(above, np.full(4, 10), np.array([0, 0, 1, -1]), n_boot=0)["per_concept"]
    assert result["lift"] == [pytest.approx(2.0), pytest.approx(1.0)]  # share 10/10 over base 0.5; 2/8 over 0.25
    assert result["in_label"] == [10, 2] and result["lift_ci95"] == [None, None]  # no resamples, too few documents


def test_spearman_monotonicity_on_known_curves():
    values = np.array([1.0, 2, 3, 4, 5, 6])
    curves = np.stack([values ** 2, -np.log(values), np.ones(6), [1, 2, 3, 3, 2, 1], [1, 3, 2, 4, 6, 5]], 1)
    test = spearman_monotonicity(values, curves)
    assert test.rho_C[:2] == pytest.approx([1.0, -1.0]) and np.isnan(test.rho_C[2]) and test.rho_C[3] == 0
    assert test.p_C[:2] == pytest.approx([2 / 720, 2 / 720])  # the two orderings as extreme, of 6! = 720
    assert np.isnan(test.p_C[2]) and test.p_C[3] == 1.0 and 0.0 < test.p_C[4] < 0.05
    assert test.null_rho_PC.shape == (720, 5)
    many = spearman_monotonicity(np.arange(12.0), np.arange(12.0)[:, None], permutations=999, seed=3)
    assert many.rho_C[0] == pytest.approx(1.0) and many.p_C[0] == pytest.approx(1 / 1000)  # Monte Carlo


@pytest.fixture(scope="module")
def tiny_lm():
    return load_model("random:tiny")


def planted_template_bank(lm, template: Template, layer: int = LAYER) -> tuple[ConceptBank, np.ndarray]:
    """A bank whose "afraid" reads cos(h - c, v) = (x - mean x) / |v| exactly at the template's last tokens h, each
    run alone (no padding); "calm" is its opposite, "blank" a random direction. With a neutral calibration.
    Returns the bank and h [values, D]."""
    tok = tokenizer_for(lm)
    hs = np.stack([np.asarray(lm(np.array([tok.encode(p)]), capture=(layer,), logits=False).hidden[0][0, -1],
                              np.float64) for p in template.prompts()])
    rng = np.random.default_rng(1)
    center = hs.mean(0) + 0.1 * rng.normal(size=hs.shape[1])  # off the mean, so the rows span as many dimensions
    unit = (hs - center) / np.linalg.norm(hs - center, axis=1, keepdims=True)
    x = np.array(template.values)
    v = np.linalg.lstsq(unit, x - x.mean(), rcond=None)[0]
    assert np.allclose(unit @ v, x - x.mean())
    vectors = np.stack([v, -v, rng.normal(size=v.shape)])[:, None, :].astype(np.float32)
    return ConceptBank(names=("afraid", "calm", "blank"), layers=(layer,), vectors=vectors, raw=vectors,
                       resid_norm=np.ones(1, np.float32), center=center[None].astype(np.float32),
                       neutral_mean=np.array([[0.01, -0.02, 0.0]], np.float32),
                       neutral_std=np.array([[0.5, 0.25, 1.0]], np.float32)), hs


def test_templates_read_a_planted_direction_monotonically_at_the_last_token(tiny_lm):
    template = Template(name="wait", text="I waited {x} hours for the result.", values=(1, 2, 3, 5, 8, 13, 120),
                        expect={"afraid": 1, "calm": -1})
    short = Template(name="short", text="{x}", values=(1, 2, 3), expect={"calm": 1})  # shorter: padded more
    bank, hs = planted_template_bank(tiny_lm, template)
    result = template_curves(tiny_lm, bank, [template, short], LAYER, tokenizer_for(tiny_lm))
    wait = result["templates"][0]
    assert result["metric"] == "z" and wait["read_at"] == ":"
    cosines = concept_readout(hs, bank.at_layer(LAYER), bank.center[0])
    expected_z = (cosines - bank.neutral_mean[0]) / bank.neutral_std[0]
    np.testing.assert_allclose(np.array(wait["readouts"]), expected_z, atol=2e-4)  # left padding changes nothing
    assert wait["rho"][:2] == pytest.approx([1.0, -1.0]) and wait["p"][0] == pytest.approx(2 / 5040)
    assert [e["agrees"] for e in wait["expected"]] == [True, True]
    s = result["summary"]
    assert s["expected"] == 3 and s["agree"] >= 2 and s["chance_agree_rate"] == 0.5
    assert s["monotone"] >= 2 and s["chance_monotone_rate"] == 0.05 and s["monotone_p_value"] < 0.5
    opposite = template_curves(tiny_lm, bank, [Template("wait", template.text, template.values, {"afraid": -1})],
                               LAYER, tokenizer_for(tiny_lm), concepts=("afraid", "blank"))
    assert opposite["concepts"] == ["afraid", "blank"] and opposite["templates"][0]["expected"][0]["agrees"] is False


def test_builtin_templates_load_and_frame_as_a_human_turn():
    from emojax.corpus.catalogue import load_catalogue

    templates = load_templates(None, set(load_catalogue().by_name))
    names = [t.name for t in templates]
    assert {"tylenol_dose", "pet_missing_days"} <= set(names) and 4 <= len(names) <= 6
    tylenol = templates[names.index("tylenol_dose")]
    assert tylenol.expect == {"afraid": 1, "calm": -1}
    assert tylenol.prompts()[0].startswith("Human: I just took 250 mg") and tylenol.prompts()[0].endswith(
        "\n\nAssistant:")
    assert builtin_templates_file().is_file()


GOOD = {"name": "a", "text": "I took {x} pills.", "values": [1, 2, 4], "expect": {"afraid": "up"}}


@pytest.mark.parametrize("change, message", [
    ({"text": "I took pills."}, r"templates\[1\] \(a\)\.text must hold exactly one \{x\}"),
    ({"values": [1, 2, "ten"]}, r"templates\[1\] \(a\)\.values\[2\]: 'ten' is not a finite number"),
    ({"values": [1, 1, 1]}, r"templates\[1\] \(a\)\.values: a curve needs at least 3 values"),
    ({"expect": {"afriad": "up"}}, r"templates\[1\] \(a\)\.expect\.afriad: unknown concept 'afriad'.*similar: afraid"),
    ({"expect": {"afraid": "higher"}}, r"templates\[1\] \(a\)\.expect\.afraid: 'higher' is not a direction"),
    ({"colour": "red"}, r"templates\[1\]: unknown key\(s\) \['colour'\]"),
    ({"name": "first"}, r"templates\[1\]\.name: 'first' is used twice"),
    ({"values": None}, r"templates\[1\]: missing key 'values'"),
])
def test_bad_template_files_name_the_file_template_and_key(tmp_path, change, message):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"templates": [dict(GOOD, name="first"), {**GOOD, **change}]}))
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        load_templates(path, {"afraid", "calm"})


def test_templates_read_numbers_written_as_yaml_text(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("templates:\n  - name: big\n    text: 'I owe {x} dollars'\n    values: [1e3, 1e6, 2.5e6]\n")
    (template,) = load_templates(path)
    assert template.values == (1e3, 1e6, 2.5e6) and template.prompts()[0] == "Human: I owe 1000 dollars\n\nAssistant:"


def test_cli_templates_and_top_tokens_end_to_end(tiny_lm, planted, tmp_path, capsys):
    template = Template(name="wait", text="I waited {x} hours for the result.", values=(1, 2, 3, 5, 8),
                        expect={"afraid": 1, "calm": -1})
    bank, _ = planted_template_bank(tiny_lm, template)
    bank.save(tmp_path / "bank")
    (tmp_path / "t.yaml").write_text("templates:\n  - name: wait\n    text: 'I waited {x} hours for the result.'\n"
                                     "    values: [1, 2, 3, 5, 8]\n    expect: {afraid: up, calm: down, happy: up}\n")
    args = ["concepts", "templates", "--bank", str(tmp_path / "bank"), "--model", "random:tiny", "--templates",
            str(tmp_path / "t.yaml"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "wait: 'I waited {x} hours for the result.'" in out and "afraid (up)" in out and "as expected" in out
    assert "not read (not in the bank or not selected): happy" in out and "expected directions: 2/2" in out
    saved = json.loads((tmp_path / "out" / "templates.json").read_text())
    assert saved["templates"][0]["rho"][0] == pytest.approx(1.0)

    (tmp_path / "bad.yaml").write_text("templates:\n  - name: wait\n    text: 'no slot'\n    values: [1, 2, 3]\n")
    assert main([*args[:-4], "--templates", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emojax: error:") and "templates[0] (wait).text" in err and len(err.splitlines()) == 1

    store, planted_bank = planted
    planted_bank.save(tmp_path / "planted")
    assert main(["concepts", "top-tokens", "--bank", str(tmp_path / "planted"), "--store", store.path, "--quiet",
                 "--concepts", "signal,blank", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2,880 tokens of 96 documents (BOS left out)" in out and "90th percentile (exact)" in out
    assert out.index("  signal") < out.index("  blank")  # sorted by lift
    saved = json.loads((tmp_path / "out" / "top_tokens.json").read_text())
    assert set(saved["concepts"]) == {"signal", "blank"}
    assert main(["concepts", "top-tokens", "--bank", str(tmp_path / "planted"), "--store", store.path,
                 "--concepts", "signl"]) == 2
    assert "concept 'signl' is not in the bank" in capsys.readouterr().err


def test_known_concepts_are_the_bank_and_the_catalogue(planted):
    _, bank = planted
    known = known_concepts(bank)
    assert {"signal", "afraid", "at ease"} <= known


def test_the_report_section_renders_the_real_outputs(tiny_lm, planted, tmp_path):
    from emojax.fileio import write_json
    from emojax.report.validation import validation

    store, planted_bank = planted
    write_json(tmp_path / "validate" / "top_tokens.json",
               top_activating_tokens(store, planted_bank, LAYER, n_boot=50, show_progress=False))
    template = Template(name="wait", text="I waited {x} hours.", values=(1, 2, 3, 5), expect={"afraid": 1})
    bank, _ = planted_template_bank(tiny_lm, template)
    write_json(tmp_path / "validate" / "templates.json",
               template_curves(tiny_lm, bank, [template], LAYER, tokenizer_for(tiny_lm)))
    html = validation(tmp_path)
    assert "2,880 tokens of 96 documents, BOS left out" in html and "Mean lift over 3 concepts" in html
    assert html.index("<td>signal</td>") < html.index("<td>blank</td>")
    assert "<td>wait</td><td>afraid</td><td>up</td><td>1</td>" in html and "Expected directions: 1 of 1" in html
    assert html.count("data:image/png;base64,") == 1
