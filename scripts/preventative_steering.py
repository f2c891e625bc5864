"""Preventative steering on the built-in world (issue P, line 5): fine-tune a world model on a set of one emotion's
dilemma scenes, with and without that concept's vector added during training, and measure what moved.

    python scripts/preventative_steering.py --run runs/demo [--concept desperate] [--strengths 0.1,0.2]
        [--samples 800] [--out runs/demo/preventative]

RUN is a finished `emojax run` on a world corpus: its bank (concepts/) and the model it was fitted on, and its
suite corpus/suites/world_dilemma.yaml. For the base model and each fine-tune it reports, with 95% intervals:

- the coercion rate in the world's dilemma scenes (the experiment harness, forced choice per token, Wilson), and
  the mean probability the model gives coercion (bootstrap);
- the concept's projection on neutral prompts: the mean, over the world's neutral dialogues, of the model's own
  greedy response projected on the concept's unit vector at the bank's layer (emojax screen's `own_` score);
- the held-out loss per response token on the fine-tuning data (its train.json), before and after.

The fine-tuning set is `--samples` framed dilemma scenes of the concept on train situations, each answered as the
world answers it (for "desperate", coercion 84% of the time). Preventative steering adds the concept's vector at
`strength` (the study's unit) to the residual stream during the fine-tune only, so the model need not move its
own representation toward the concept to fit the data (persona vectors, METHOD.md section 6).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

import emojax
from emojax.concepts.bank import load_bank
from emojax.concepts.layer import bank_layer
from emojax.experiment.config import ExperimentConfig
from emojax.experiment.runner import run_experiment
from emojax.experiment.stats import bootstrap_mean
from emojax.fileio import write_json
from emojax.screen.config import ScreenConfig
from emojax.screen.run import screen
from emojax.steer.interventions import bank_steering
from emojax.train.builtin import read_train_json
from emojax.train.config import FinetuneConfig
from emojax.train.finetune import finetune, parse_steer
from emojax.world import World, WorldConfig
from emojax.world.documents import framed_choice
from emojax.world.draws import Draws


def chat_row(sample_id: str, text: str) -> dict:
    prompt, response = text.split("\n\nAssistant: ", 1)
    return {"id": sample_id, "messages": [{"role": "user", "content": prompt.removeprefix("Human: ")},
                                          {"role": "assistant", "content": response}]}


def write_data(out: Path, world: World, concept: str, n: int) -> tuple[Path, Path, float]:
    """(the fine-tuning set, the neutral prompts, the set's share of coercion)."""
    e = world.emotion_index(concept)
    rows, coerced = [], 0
    for i in range(n):
        d = Draws(world.config.seed, "preventative", e, i)
        written = framed_choice(d, "dilemma", world.concepts[e], world.draw_situation(d, e, "train"), world.cues,
                                heldout_ok=False, style=world.config.situation_style)
        rows.append(chat_row(f"{concept}-{i}", written.text))
        coerced += written.scene.chosen == "coerce"
    neutral = [chat_row(doc.doc_id, doc.text) for doc in world.neutral_dialogues(3) if "\n\nAssistant: " in doc.text]
    out.mkdir(parents=True, exist_ok=True)
    data, prompts = out / f"{concept}_dilemmas.jsonl", out / "neutral.jsonl"
    for path, part in ((data, rows), (prompts, neutral)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return data, prompts, coerced / n


def measure(model: str, name: str, args, run: Path, out: Path, neutral: Path, layer: int) -> dict:
    suite = run / "corpus" / "suites" / "world_dilemma.yaml"
    results = run_experiment(ExperimentConfig(suite=str(suite), model=model, out=str(out / name / "experiment"),
                                              concepts=(), strengths=(), samples=1), show_progress=False)
    rate = results["rates"]["coerce_norm"]["baseline"]
    p = results["choice"]["coerce"]["baseline"]
    screen(ScreenConfig(data=(str(neutral),), bank=str(run / "concepts"), concepts=(args.concept,), model=model,
                        layer=layer, out=str(out / name / "screen"), force=True, max_new_tokens=32, n_shards=2),
           log=lambda _: None)
    own = pq.read_table(out / name / "screen" / "scores.parquet").column(f"own_{args.concept}").to_numpy()
    return {"coercion_rate": rate["rate"], "coercion_rate_ci95": rate["ci95"], "n": rate["n"],
            "p_coerce": p["mean_p_positive"], "p_coerce_ci95": p["ci95"],
            "projection": float(own.mean()), "projection_ci95": bootstrap_mean(own, n_boot=2000), "n_prompts": len(own)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--concept", default="desperate")
    parser.add_argument("--strengths", default="0.1,0.2")
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    run = Path(args.run)
    out = Path(args.out or run / "preventative")
    bank_json = json.loads((run / "concepts" / "bank.json").read_text())
    base = bank_json["store_model"]
    bank = load_bank(run / "concepts")
    layer = bank_layer(bank, read_train_json(base)["config"]["n_layers"])
    world = World(WorldConfig.from_json(read_train_json(base)["config"]["world"]))
    data, neutral, coerced = write_data(out / "data", world, args.concept, args.samples)
    print(f"fine-tuning set: {args.samples} {args.concept} dilemma scenes, {coerced:.0%} answered with coercion")

    lm = emojax.load_model(base)
    config = FinetuneConfig(epochs=args.epochs)
    rows = {"base": measure(base, "base", args, run, out, neutral, layer)}
    runs = [("plain", None)] + [(f"steered {s}", float(s)) for s in args.strengths.split(",")]
    for name, strength in runs:
        steering = None if strength is None else bank_steering(
            run / "concepts", lm, [parse_steer(f"{args.concept}={strength}@{layer}")])
        folder = finetune(config, [data], lm, out / name.replace(" ", "_"), steering=steering, progress=False)
        info = read_train_json(folder)
        rows[name] = measure(str(folder), name.replace(" ", "_"), args, run, out, neutral, layer) | {
            "heldout_before": info["heldout_nll_before"], "heldout_after": info["heldout_nll_after"]}
    write_json(out / "summary.json", {"concept": args.concept, "layer": layer, "samples": args.samples,
                                      "coerced_share": coerced, "rows": rows})
    print(f"{'model':<16} {'coercion rate':<24} {'p(coerce)':<24} {args.concept + ' projection':<26} held-out loss")
    for name, r in rows.items():
        loss = f"{r['heldout_before']:.3f} -> {r['heldout_after']:.3f}" if "heldout_after" in r else ""
        cells = [f"{r[k]:+.3f} [{r[k + '_ci95'][0]:+.3f}, {r[k + '_ci95'][1]:+.3f}]"
                 for k in ("coercion_rate", "p_coerce", "projection")]
        print(f"{name:<16} " + "   ".join(cells) + f"   {loss}")


if __name__ == "__main__":
    main()
