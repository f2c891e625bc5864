"""The report's sections: each takes the run directory and returns its HTML body, or raises NotRun when the
stage that feeds it has not written its outputs. Section 5 lives in validation.py; the HTML pieces every section
builds with (which escape what they place) in markup.py.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np

from emojax.report import figures, inputs, validation
from emojax.report.markup import NotRun, img, interval, is_number, need, show, table

MONITOR_TOP = 8  # concepts shown in the monitored sample's heatmap


# ---- summaries


def corpus_summary(run_dir: Path) -> str:
    m = need(inputs.corpus_manifest(run_dir), "corpus/manifest.json is missing")
    counts = [[k, m.get(k)] for k in ("documents_in", "documents_written", "rejected", "deduplicated",
                                      "tokens_written")]
    counts.append(["shards", len(m.get("shards", []))])
    counts.append(["tokenizer", m.get("tokenizer")])
    splits = m.get("per_split", {})
    per_label = m.get("per_label", {})
    split_names = sorted({s for v in per_label.values() for s in v} | set(splits))
    label_rows = [[name, *[per_label[name].get(s, 0) for s in split_names]] for name in sorted(per_label)]
    parts = [table(["count", "value"], counts, "kv"),
             table(["split", "documents"], [[s, n] for s, n in splits.items()], "kv")]
    out = '<div class="row">' + "".join(parts) + "</div>"
    out += (f"<details><summary>{len(per_label)} labels: documents per label and split</summary>"
            f"{table(['label', *split_names], label_rows, 'compact')}</details>")
    return out


def run_summary(run_dir: Path) -> str:
    stages, store, dumps = inputs.stage_records(run_dir), inputs.store_state(run_dir), inputs.dump_summaries(run_dir)
    if not stages and store is None:
        raise NotRun("no stages/*.json and no activations/store.json")
    out = ""
    if stages:
        rows = [[s.get("stage", s["_file"]), s.get("seconds"), s.get("skipped", False), s.get("summary", {})]
                for s in stages]
        total = sum(float(s.get("seconds") or 0) for s in stages)
        out += table(["stage", "wall time (s)", "skipped", "summary / throughput"], rows + [["total", total, "", ""]])
    if store is not None:
        keys = ("model", "layers", "d_model", "dtype", "n_docs", "n_tokens", "short_docs", "complete")
        out += "<h3>Activation store</h3>" + table(["key", "value"], [[k, store.get(k)] for k in keys], "kv")
    if dumps:
        keys = ("process", "documents", "tokens", "seconds", "tokens_per_s", "mb_per_s", "shards_written",
                "shards_skipped")
        out += "<h3>Dump throughput</h3>" + table(list(keys), [[d.get(k) for k in keys] for d in dumps])
    return out


def model_summary(run_dir: Path) -> str:
    """The built-in model's held-out loss against a unigram baseline and, for the world, the world's entropy."""
    train = next((s for s in inputs.stage_records(run_dir) if s.get("stage") == "train"), None)
    m = (train or {}).get("summary") or {}
    if "heldout_nll" not in m:
        raise NotRun("no built-in model trained for this run (stages/train.json has no held-out loss)")
    rows = [["this model", m["heldout_nll"], m.get("heldout_perplexity")],
            ["unigram baseline (train token frequencies)", m.get("unigram_nll"), m.get("unigram_perplexity")]]
    world = m.get("world_entropy") or {}
    note = ""
    if world.get("nats_per_token") is not None:
        floor = world["nats_per_token"]
        rows.append(["the world's own entropy (the floor any model could reach)", floor, float(np.exp(floor))])
        span = (m.get("unigram_nll") or 0.0) - floor
        learned = ((m["unigram_nll"] - m["heldout_nll"]) / span) if span > 0 else None
        note = (f" on {show(world.get('documents'))} world documents written on situations held out from training "
                f"({show(world.get('tokens'))} target tokens). The model closes {show(learned)} of the gap between "
                "the unigram baseline and the world's entropy (1 = all of it). The entropy is an upper bound of the "
                "text's own (docs/world.md), so the true gap is a little larger")
    tokens = m.get("tokens") or {}
    out = (f"<p>{show(m.get('parameters'))} parameters, trained on {show(tokens.get('trained_on'))} tokens. Held-out "
           f"loss in nats per target token{note}.</p>")
    return out + table(["model", "nats / token", "perplexity"], rows, "kv")


# ---- concepts


def _layer_geometry(run_dir: Path):
    """(names, best layer, geometry dict of eval.json or recomputed from the bank, eval.json)."""
    evaluation, bank = inputs.concept_eval(run_dir), inputs.concept_bank(run_dir)
    if evaluation is None and bank is None:
        raise NotRun("concepts/eval.json and concepts/bank.* are missing")
    best = inputs.best_layer(evaluation, bank)
    names = list(evaluation["concepts"]) if evaluation else list(bank.names)
    geometry = ((evaluation or {}).get("per_layer", {}).get(str(best)) or {}).get("geometry")
    if geometry is None:
        need(bank, f"no geometry for layer {best} in eval.json and no bank")
        from emojax.concepts.geometry import layer_geometry

        geometry = layer_geometry(tuple(bank.names), bank.at_layer(best), 10, 0)
        names = list(bank.names)
    return names, best, geometry, evaluation


def emotion_map(run_dir: Path) -> str:
    from emojax.world import load_coordinates

    names, best, geo, _ = _layer_geometry(run_dir)
    coords = load_coordinates()
    known = set(coords.names)
    scores = np.array([(geo["pc_scores"][n] + [0.0, 0.0])[:2] for n in names], float)
    valence = [coords.of(n)["valence"] if n in known else None for n in names]
    clusters = [int(geo["clusters"][n]) for n in names] if geo.get("clusters") else None
    uri = figures.emotion_map(names, scores, valence, geo.get("explained_variance", []), clusters)
    ann = geo.get("annotations", {})
    pairs = (("pc1", "valence"), ("pc2", "arousal"), ("pc3", "arousal"), ("pc1", "arousal"), ("pc2", "valence"),
             ("pc3", "valence"))  # the study's three first
    corr = [[f"{pc.upper()} ~ {what}", interval(ann, f"{pc}_{what}_abs_r")] for pc, what in pairs
            if f"{pc}_{what}_abs_r" in ann]
    flipped = ann.get("pc1_flipped")
    orientation = ("PC1's sign was flipped so that positive valence scores positive" if flipped is True else
                   "PC1 is oriented so that positive valence scores positive (no flip needed)" if flipped is False
                   else "PC1's sign is arbitrary (no valence annotations)")
    arousal = f"; arousal tracks {show(str(ann['arousal_pc']).upper())} more closely" if "arousal_pc" in ann else ""
    note = (f"<p>Residual index {show(best)}: {len(names)} concepts, [k] = k-means cluster. The study found PC1 ~ "
            "valence and PC2 (or a mix of PC2 and PC3) ~ arousal. abs(Pearson r) with the concepts' graded valence "
            "and arousal (emojax's own coordinates, emojax/world/data/coordinates.csv; "
            f"{show(ann.get('n_annotated', 0))} concepts); {orientation}{arousal}:</p>")
    return img(uri, "emotion map") + note + (table(["correlation", "abs(r) (bootstrap 95% CI)"], corr, "kv")
                                             if corr else "")


def cosine_heatmap(run_dir: Path) -> str:
    names, best, geo, _ = _layer_geometry(run_dir)
    cos = np.asarray(geo["cosine"], float)
    order = figures.cluster_order(cos)
    clusters = geo.get("clusters") or {}
    groups: dict[int, list[str]] = {}
    for n in names:
        if n in clusters:
            groups.setdefault(int(clusters[n]), []).append(n)
    rows = [[k, ", ".join(v)] for k, v in sorted(groups.items())]
    return (img(figures.cosine_heatmap(names, cos, order), "cosine similarity heatmap")
            + f"<p>Residual index {show(best)}; rows ordered by average-linkage clustering on 1 - cosine.</p>"
            + (f"<h3>k-means clusters (k={len(groups)})</h3>" + table(["cluster", "concepts"], rows) if rows else ""))


def _against_baselines(evaluation: dict, random_init: dict | None) -> str:
    """One sentence per split: the best layer's nearest-vector figures against chance, the bag-of-words reader
    on the same documents and the same fit on a random-init model of the same shape (at its own best layer)."""
    best = evaluation.get("best_layer")
    layer = evaluation.get("per_layer", {}).get(str(best), {})
    bow = (evaluation.get("baselines") or {}).get("bag_of_tokens", {})
    rnd = ((random_init or {}).get("per_layer") or {}).get(str((random_init or {}).get("best_layer")), {})
    sentences = []
    for split, what in (("test", "the test split"), ("implicit", "the implicit scenarios (pooled)"),
                        ("implicit_at_assistant", "the implicit scenarios read at the ':' after \"Assistant\"")):
        m, b = layer.get(split, {}).get("nearest"), bow.get(split) or {}
        if not m or not m.get("n"):
            continue
        chance = m.get("chance", {})
        text = (f"On {escape(what)} ({show(m['n'])} documents) the concept vectors at layer {show(best)} "
                f"name the right concept first for {interval(m, 'top1', 100, 1, '%')} of documents, against "
                f"{interval(chance, 'top1', 100, 1, '%')} by chance")
        if b:
            text += f", {interval(b, 'top1', 100, 1, '%')} for a bag-of-words reader of the same documents"
            if "sample" in bow.get("method", ""):
                text += f" ({escape(bow['method'])})"
        r = rnd.get(split, {}).get("nearest") or {}
        if r.get("n"):
            text += (f" and {interval(r, 'top1', 100, 1, '%')} for the same fit on a random-init model of the same "
                     "shape")
        if is_number(m.get("macro_auroc")):
            text += f"; macro AUROC {interval(m, 'macro_auroc')} against 0.5 by chance"
            text += f" and {interval(b, 'macro_auroc')} for bag-of-words" if b else ""
        sentences.append(text + ".")
    if not sentences:
        return ""
    return ("<p>" + " ".join(sentences) + " Figures whose interval overlaps chance or the bag-of-words reader do not "
            "show that the model represents the concepts beyond their words.</p>")


def accuracy(run_dir: Path) -> str:
    evaluation = need(inputs.concept_eval(run_dir), "concepts/eval.json is missing")
    per_layer = evaluation.get("per_layer", {})
    layers = sorted(int(k) for k in per_layer)
    series: dict[str, list] = {}
    for split in ("test", "implicit", "val"):
        for readout in ("nearest", "probe"):
            for k in ("top1", "top5"):
                values = [per_layer[str(L)].get(split, {}).get(readout, {}).get(k) for L in layers]
                if any(v is not None for v in values):
                    series[f"{split} {readout} {k}"] = values
    need(series, "eval.json has no held-out metrics")
    C = len(evaluation.get("concepts", []))
    best = evaluation.get("best_layer")
    rows = []
    for L in layers:
        for split in ("val", "test", "implicit", "implicit_at_assistant"):
            for readout in ("nearest", "probe"):
                m = per_layer[str(L)].get(split, {}).get(readout)
                if m:
                    rows.append([L, split, readout, m.get("n"), m.get("top1"), m.get("top5"), m.get("macro_auroc")])
    return (img(figures.accuracy_by_layer(layers, series, C, best), "held-out accuracy by layer")
            + _against_baselines(evaluation, inputs.random_init_eval(run_dir))
            + f"<p>Method {escape(str(evaluation.get('method')))}; best layer {show(best)} by "
              f"{escape(str(evaluation.get('best_by', '')))}; {C} concepts.</p>"
            + f"<details><summary>all metrics</summary>"
              f"{table(['layer', 'split', 'readout', 'n', 'top-1', 'top-5', 'macro AUROC'], rows)}</details>")


def logit_lens(run_dir: Path) -> str:
    evaluation = need(inputs.concept_eval(run_dir), "concepts/eval.json is missing")
    best = inputs.best_layer(evaluation, None)
    lens = need((evaluation.get("per_layer", {}).get(str(best)) or {}).get("logit_lens"),
                 f"eval.json has no logit lens at layer {best} (fit.model was not set)")

    def toks(ts):
        return " ".join(f"<code>{escape(repr(t)[1:-1])}</code>" for t in ts)

    body = "".join(
        f"<tr><td>{escape(name)}</td><td>{toks(e.get('top', []))}</td><td>{toks(e.get('bottom', []))}</td>"
        f"<td>{escape(str(e.get('own_token', '-')))}</td><td>{show(e.get('own_rank'))}</td></tr>"
        for name, e in lens.items())
    return (f"<p>Each concept vector at residual index {show(best)} through the final norm and unembedding.</p>"
            '<table class="lens"><thead><tr><th>concept</th><th>top tokens</th><th>bottom tokens</th>'
            f"<th>own token</th><th>its rank</th></tr></thead><tbody>{body}</tbody></table>")


# ---- SAE, steering, monitoring


def sae(run_dir: Path) -> str:
    rows = need(inputs.sae_metrics(run_dir), "no sae/*/metrics.json")
    keys = ["name", "l0", "fvu", "dead_fraction"] + [k for k in ("ce_loss_recovered", "delta_loss", "kl")
                                                      if any(k in r for r in rows)]
    return img(figures.sae_tradeoff(rows), "SAE L0 vs FVU") + table(keys, [[r.get(k) for k in keys] for r in rows])


def steering(run_dir: Path) -> str:
    curves = need(inputs.steering_curves(run_dir), "steer/curves.json is missing")
    concepts = need(curves["concepts"], "steer/curves.json has no concepts")
    return (f"<p>Steered at residual index {show(curves.get('layer', '-'))}, read at residual index "
            f"{show(curves.get('read_layer', '-'))}; strength in units of the mean residual-stream norm.</p>"
            + img(figures.steering_curves(concepts), "steering curves"))


def monitor(run_dir: Path) -> str:
    sample = need(inputs.monitored_sample(run_dir), "steer/monitor.json is missing")
    readings = np.asarray(sample["readings"], float).reshape(len(sample["tokens"]), len(sample["concepts"]))
    need(sample["tokens"], "steer/monitor.json has no tokens")
    top = np.argsort(-np.abs(readings).max(0), kind="stable")[:MONITOR_TOP]
    names = [sample["concepts"][i] for i in top]
    uri = figures.monitor_heatmap(list(sample["tokens"]), names, readings[:, top])
    unit = ("z-scores of the fit's readout cos(x - center, v) against neutral text (standard deviations above "
            "neutral text's mean)" if sample.get("metric") == "z" else "the fit's readout cos(x - center, v)")
    return (f"<p>Layer {show(sample.get('layer', '-'))}; readings are {unit}; the "
            f"{len(names)} concepts with the largest |reading| of "
            f"{len(sample['concepts'])}.</p><blockquote>{escape(sample.get('text', ''))}</blockquote>"
            + img(uri, "monitored generation heatmap"))


def _rate(m: dict | None) -> str:
    if not m or m.get("rate") is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{100 * m['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def experiment(run_dir: Path) -> str:
    from emojax.experiment.results import MIN_SAMPLES, rate_figure

    r = need(inputs.experiment_results(run_dir), "experiment/results.json is missing")
    conds = [c["id"] for c in r["conditions"]]
    out = (f"<p>Suite <b>{escape(r['suite'])}</b> ({show(r['scenarios'])} scenarios): {escape(r['description'])} "
           f"Steered at residual index {show(r['layers'])}, strength in {escape(r['unit'])} units, on "
           f"{escape(r['positions'])} positions. Rates with Wilson 95% intervals; a rate over fewer than "
           f"{MIN_SAMPLES} samples is marked (too few for a rate claim, METHOD.md section 8).</p>")
    out += img(figures.to_data_uri(rate_figure(r)), "outcome rate against steering strength")
    keys = list(r["rates"])
    rows = []
    for cid in conds:
        row = [cid]
        for key in keys:
            m = r["rates"][key][cid]
            mark = " *" if m.get("underpowered") else ""
            row.append(f"{_rate(m)} n={m['n']}{mark}" + (f", {m['failed']} failed" if m.get("failed") else ""))
        rows.append(row)
    out += table(["condition", *[r["outcomes"][k] for k in keys]], rows, "compact")
    fits = [[key, name, f["slope"], f["slope_ci95"], f["p_value"]] for key, per in r["dose_response"].items()
            for name, f in per.items() if f]
    if fits:
        out += ("<p>Dose-response: logistic regression of each outcome on strength (the baseline as 0); slope per "
                "unit with its 95% profile-likelihood interval (an open side: unbounded).</p>"
                + table(["outcome", "concept", "slope", "95% interval", "p"], fits, "compact"))
    if r["published"]:
        pub = [[row["condition"], row["published"], row.get("here") or "-", "not run" if row["measured"] is None
                else _rate({"rate": row["measured"], "ci95": row["ci95"]}), row["n"]] for row in r["published"]]
        out += (f"<p>The study's published figures (METHOD.md section 5; another model, its own scenarios) beside "
                f"this run's rate of the closest condition ({escape(r['outcomes'][r['published'][0]['outcome']])}):</p>"
                + table(["condition", "study", "closest here", "measured here", "n"], pub, "compact"))
    for key, table_ in r.get("elo", {}).items():
        shifts = [[cid, v] for cid, v in table_["mean_abs_shift"].items()]
        out += f"<p>{escape(key)}: mean absolute Elo shift from the baseline per condition.</p>" + table(
            ["condition", "mean |shift|"], shifts, "compact")
    if r["not_measured"]:
        out += "<p>Not measured: " + "; ".join(f"{escape(x['outcome'])} ({escape(x['why'])})"
                                              for x in r["not_measured"]) + ".</p>"
    return out


SECTIONS = (
    ("corpus", "Corpus", corpus_summary),
    ("run", "Run: stages, wall time and throughput", run_summary),
    ("model", "The built-in model: held-out loss", model_summary),
    ("emotion-map", "1. Emotion map: PC1 vs PC2 of the concept vectors", emotion_map),
    ("cosine", "2. Clustered cosine similarity", cosine_heatmap),
    ("accuracy", "3. Held-out accuracy by layer", accuracy),
    ("logit-lens", "4. Logit lens", logit_lens),
    ("validation", "5. Validation: top-activating tokens and numeric templates", validation.validation),
    ("sae", "6. Sparse autoencoders: L0 vs FVU and dead latents", sae),
    ("steering", "7. Steering: concept readout and fluency vs strength", steering),
    ("monitor", "8. Monitored generation", monitor),
    ("experiment", "9. Behavioural experiment: rates under steering", experiment),
)
