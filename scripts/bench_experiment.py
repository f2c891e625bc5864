"""Experiment harness throughput: emojax's `Experiment.run` against transformers with a steering hook running the
same suites under the same conditions, in the same run.

    python scripts/bench_experiment.py [--model-shape tiny|56m|1b] [--batch 32] [--rounds 2] [--samples 4]
                                       [--scenarios 100] [--gen-scenarios 16] [--new-tokens 64] [--greedy]
                                       [--device cpu|gpu] [--only choice,generate] [--seed 0]

Model: emojax's random model of --model-shape, written with lm.save; emojax reads it back with load_model (so
the bank below can record its identity and the harness checks it without a warning), transformers with
from_pretrained: the same weights on both sides, float32. The checkpoint has no tokenizer.json, so both sides
use emojax's byte tokenizer (tokenizer_for: UTF-8 bytes, BOS 256); it has no EOS, so the harness stops no
row early and both sides generate exactly --new-tokens tokens (transformers: min_new_tokens =
max_new_tokens, eos_token_id=None). Byte tokens make the sequences ~4x longer than a BPE tokenizer would.

Bank: a ConceptBank built in memory with three random unit directions at residual index n_layers // 2;
resid_norm is the model's mean residual-stream norm there over the choice prompts' real tokens after BOS, so
the strengths are fractions of the stream's norm (unit "norm", the study's unit). Conditions: the baseline and
3 concepts x 3 strengths = 10.

Forced choice (`choice`): a synthetic suite of --scenarios (100) scenarios with one 2-option choice outcome:
10 x 100 = 1,000 (condition, scenario) samples, 2,000 scored sequences. emojax: a fresh
`Experiment(config, lm=lm, bank=bank).run(show_progress=False)` into a new out folder per call (its shards
are resumable: a reused folder would skip the work), the whole harness: plan, tokenising, one
`lm.token_logprobs` per batch with per-row strengths, shards, tables, the figure. transformers: the same
sequences (emojax's token ids, batched as the harness batches them, --batch rows, left-padded to the batch's
longest), one forward per batch with a `register_forward_hook` on decoder layer n_layers // 2 - 1 adding
each row's strength x its concept's vector (0 for the baseline) at every position, position ids counted from
each row's first real token (as emojax), logits only for the option positions (`logits_to_keep`, the cheapest
form), log-softmax and a gather of the option tokens, the higher total log-probability chosen. Its inputs are
tensorised once outside the timing (its best case). samples/s = (condition, scenario) pairs per second.
`agreement`: the share of samples where both sides choose the same option (float32: >= 0.99 expected);
`max_abs_logp_diff` compares the option scores; `steered_changed` is the share of steered samples whose
choice differs from the baseline's on that scenario and `steered_margin_shift` the mean absolute change of
log P(A) - log P(B) they bring (that the steering acts at all). The strengths are large (-1, 0.5 and 1 x the
norm): random weights barely move a choice at the study's 0.05-0.1.

Generation (`generate`): a suite of --gen-scenarios (16) scenarios x 10 conditions x --samples (4) replies of
--new-tokens (64) tokens, sampled at temperature 1.0 (top-k off, top-p 1) or greedy with --greedy. emojax:
the harness as above (per-row strengths and per-row sampling seeds in one compiled decode loop).
transformers: `model.generate` over the same batches with the same per-row steering hook (it acts on the
prompt pass and every decoding step, as emojax's positions="all"). Sampling draws differ between the sides,
so only throughput is compared; with --greedy `agreement` is the share of equal generated tokens.
samples/s = replies per second; `emojax_tok_s` / `baseline_tok_s` = generated tokens per second.

The harness builds its `Decoder` lazily per Experiment, and a new Decoder compiles its decode loop again (its
jit is per instance). A user's run builds one Experiment and compiles once; so that the timed calls measure
the run and not a recompile, every fresh Experiment here is handed the one warmed Decoder (`exp._decoder`).

Timing: each side is warmed up first, untimed: emojax by a harness run over one scenario of the suite (the
compilation of the program the full run uses: `emojax_compile_s`, which includes that scenario's rows),
transformers by its first batch (`baseline_warmup_s`). Then --rounds rounds alternate one timed call of each
side (emojax first), so a drift of a shared machine hits both alike; the first round's outputs give the
agreement figures, and `emojax_retraces_timed` counts the programs emojax compiled during the timed calls (0:
the timing holds no compilation). The median call of each side is reported, with every round's ratio.
`*_foreign_cores`: the most cores other processes kept busy during a side's timed calls (CPU figures mean
little when it is not near 0). One JSON line per figure on stdout: `bench`, `emojax`, `baseline`, `ratio`
(emojax / baseline, higher is better), `unit`, `agreement` and the details. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SHAPE_NAMES, emit, env_info, log, start_against_torch, time_fn, timed_rounds  # noqa: E402

TASKS = ("choice", "generate")
CONCEPTS = ("alpha", "beta", "gamma")
# Fractions of the mean residual norm at the layer; large, since random weights barely move a choice at the
# study's 0.05-0.1.
STRENGTHS = (-1.0, 0.5, 1.0)
WORDS = ["river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "ocean", "candle", "forest", "violet",
         "marble", "rocket", "garden", "silver", "window", "meadow", "copper", "harbor", "falcon"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=sorted(SHAPE_NAMES), default="tiny",
                   help="tiny (a smoke run), 56m (PERFORMANCE.md's CPU figure) or 1b")
    p.add_argument("--batch", type=int, default=32, help="rows per batch on both sides (experiment.batch_size)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="replies per condition and scenario (generate)")
    p.add_argument("--scenarios", type=int, default=100, help="forced-choice scenarios")
    p.add_argument("--gen-scenarios", type=int, default=16, help="generation scenarios")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="generate greedily and report token agreement")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--only", default=",".join(TASKS), help="comma-separated: choice, generate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in args.only if t not in TASKS]
    if unknown or not args.only:
        p.error(f"--only: unknown task {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    for name in ("batch", "rounds", "samples", "scenarios", "gen_scenarios", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- suites and bank -----------------------------------------------------------------------------------------

def choice_suite(n: int) -> dict:
    """n scenarios with one 2-option forced choice (option texts of 6 byte tokens each, so that neither wins by
    its length alone)."""
    return {"name": "bench_choice",
            "messages": [{"role": "user", "content": "Plan {n}, {word}: A or B?"},
                         {"role": "assistant", "content": "I pick ("}],
            "scenarios": [{"id": f"s{i:03d}", "n": str(i), "word": WORDS[i % len(WORDS)]} for i in range(n)],
            "outcomes": [{"name": "picks_a", "kind": "choice", "options": {"A": "A) yes", "B": "B) not"},
                          "positive": "A"}]}


def generate_suite(n: int, samples: int, new_tokens: int, temperature: float) -> dict:
    """n scenarios with one rule outcome, so the harness only generates."""
    return {"name": "bench_generate",
            "messages": [{"role": "user", "content": "Tell me about the {word} ({n})."}],
            "scenarios": [{"id": f"g{i:03d}", "n": str(i), "word": WORDS[i % len(WORDS)]} for i in range(n)],
            "outcomes": [{"name": "says_yes", "kind": "rule", "match": ["(?i)yes"]}],
            "generation": {"max_new_tokens": new_tokens, "temperature": temperature, "top_p": 1.0,
                           "samples": samples}}


def write_suite(folder: Path, data: dict) -> str:
    import yaml

    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def make_bank(lm, layer: int, suite_path: str, seed: int):
    """Three random unit directions at residual index `layer`; resid_norm: the mean norm of the residual stream
    there over the suite's prompts (real tokens after BOS)."""
    import numpy as np

    from emojax.concepts.bank import ConceptBank
    from emojax.experiment import load_suite
    from emojax.models.lm import tokenizer_for

    suite, tok = load_suite(suite_path), tokenizer_for(lm)
    ids = [tok.encode_prompt(suite.prompt(s, tok)) for s in suite.scenarios]
    T = max(len(x) for x in ids)
    tokens, mask = np.zeros((len(ids), T), np.int32), np.zeros((len(ids), T), np.int32)
    for b, x in enumerate(ids):
        tokens[b, T - len(x):], mask[b, T - len(x) + 1:] = x, 1  # the mask (for the mean) leaves out BOS
    full = mask.copy()
    full[np.arange(len(ids)), T - np.array([len(x) for x in ids])] = 1
    resid = np.asarray(lm(tokens, attention_mask=full, capture=(layer,), logits=False).hidden[0])
    norm = float(np.linalg.norm(resid, axis=-1)[mask > 0].mean())
    d = lm.config.d_model
    v = np.random.default_rng(seed + 1).normal(size=(len(CONCEPTS), 1, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    bank = ConceptBank(names=CONCEPTS, layers=(layer,), vectors=v, raw=v.copy(),
                       resid_norm=np.array([norm], np.float32), info={"model_identity": lm.identity})
    return bank, norm


def make_recording_decoder(lm):
    """emojax's Decoder, appending the generated tokens [B, n] of every call to `calls` (the greedy agreement;
    the harness reads the tokens back to the host anyway)."""
    import numpy as np

    from emojax.steer.decode import Decoder

    class RecordingDecoder(Decoder):
        calls: list

        def generate(self, *args, **kwargs):
            gen = super().generate(*args, **kwargs)
            n = kwargs["max_new_tokens"]
            self.calls.append(np.asarray(gen.tokens)[:, gen.prompt_columns:gen.prompt_columns + n])
            return gen

    decoder = RecordingDecoder(lm)
    decoder.calls = []
    return decoder


# -- the two sides -------------------------------------------------------------------------------------------

def emojax_side(config, lm, bank, decoder, root: Path):
    """step(**config changes) -> (the out folder of one fresh harness run, the tokens the decoder generated:
    one [B, n] array per batch, None without a decoder)."""
    from emojax.experiment import Experiment

    def step(**changes) -> tuple[Path, list | None]:
        out = Path(tempfile.mkdtemp(prefix="out-", dir=root))  # fresh: a reused folder would skip its shards
        exp = Experiment(dataclasses.replace(config, out=str(out), **changes), lm=lm, bank=bank,
                         decoder=decoder)  # one Decoder, compiled once (see the module docstring)
        if decoder is not None:
            decoder.calls = []
        exp.run(show_progress=False)
        return out, None if decoder is None else decoder.calls

    return step


def row_vectors(plan, conds, unit: str):
    """[b, D] float32: each row's strength x its condition's steering vector (0 for the baseline)."""
    import numpy as np

    from emojax.steer.interventions import bank_direction

    rows = np.zeros((len(conds), plan.lm.config.d_model), np.float32)
    for b, c in enumerate(conds):
        cond = plan.conditions[c]
        if cond.kind == "steer":
            rows[b] = cond.strength * bank_direction(plan.bank, cond.concept, cond.layer, unit)
    return rows


def load_transformers(path: str, layer: int, device: str):
    """(model, steer): steer[0] is the [b, 1, D] tensor the hook adds to decoder layer `layer - 1`'s output."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch_device(device)).eval()
    steer = [None]

    def add_rows(module, args, output):  # residual index `layer` = output of decoder layer `layer - 1`
        if isinstance(output, tuple):
            return (output[0] + steer[0], *output[1:])
        return output + steer[0]

    model.model.layers[layer - 1].register_forward_hook(add_rows)
    return model, steer


def torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


def left_padded(rows: list[list[int]], device: str):
    import numpy as np
    import torch

    T = max(len(x) for x in rows)
    ids, mask = np.zeros((len(rows), T), np.int64), np.zeros((len(rows), T), np.int64)
    for b, x in enumerate(rows):
        ids[b, T - len(x):], mask[b, T - len(x):] = x, 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tuple(torch.from_numpy(a).to(torch_device(device)) for a in (ids, mask, pos))


def transformers_choice(model, steer, plan, batch: int, device: str):
    """step(limit=None) -> {(condition id, scenario id): {label: log P(option | prompt)}} for the plan's choice
    rows, batched as the harness batches them (the first `limit` batches only: a warm-up)."""
    import torch

    from emojax.experiment.suite import fill

    tok = plan.tokenizer
    outcome = next(o for o in plan.outcomes if o.kind == "choice")
    batches = []
    for shard in (s for s in plan.shards if s.task == "choice"):
        seqs = []  # (key, label, ids, n_option, condition)
        for c, s, _ in shard.rows:
            scenario = plan.scenarios[s]
            prompt = tok.encode_prompt(plan.suite.prompt(scenario, tok))
            for label, text in outcome.options.items():
                option = tok.encode(fill(text, scenario), add_special_tokens=False)
                seqs.append(((plan.conditions[c].id, scenario["id"]), label, prompt + option, len(option), c))
        for start in range(0, len(seqs), batch):
            part = seqs[start:start + batch]
            ids, mask, pos = left_padded([x[2] for x in part], device)
            k = max(x[3] for x in part) + 1  # the logits that predict the option tokens, and one before
            picks = torch.zeros((len(part), k - 1), dtype=torch.float32, device=ids.device)
            for b, x in enumerate(part):
                picks[b, k - 1 - x[3]:] = 1.0
            add = torch.from_numpy(row_vectors(plan, [x[4] for x in part], plan.config.unit)).to(ids.device)
            batches.append((ids, mask, pos, k, picks, add[:, None, :], [(x[0], x[1]) for x in part]))

    def step(limit: int | None = None) -> dict:
        scores: dict = {}
        with torch.inference_mode():
            for ids, mask, pos, k, picks, add, keys in batches[:limit]:
                steer[0] = add
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                picked = logp.gather(-1, ids[:, -(k - 1):, None])[..., 0]
                for (key, label), score in zip(keys, (picked * picks).sum(1).tolist()):
                    scores.setdefault(key, {})[label] = score
        return scores

    return step, sum(len(b[6]) for b in batches)


def transformers_generate(model, steer, plan, batch: int, new_tokens: int, greedy: bool, seed: int,
                          device: str):
    """step(limit=None) -> the generated tokens [b, new_tokens] of every batch, batched as the harness batches
    them (the first `limit` batches only: a warm-up)."""
    import numpy as np
    import torch

    tok = plan.tokenizer
    batches = []
    for shard in (s for s in plan.shards if s.task == "generate"):
        rows = list(shard.rows)
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            prompts = [tok.encode_prompt(plan.suite.prompt(plan.scenarios[s], tok)) for _, s, _ in part]
            ids, mask, _ = left_padded(prompts, device)
            add = torch.from_numpy(row_vectors(plan, [c for c, _, _ in part], plan.config.unit)).to(ids.device)
            batches.append((ids, mask, add[:, None, :]))
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)

    def step(limit: int | None = None) -> list:
        torch.manual_seed(seed)
        outs = []
        with torch.inference_mode():
            for ids, mask, add in batches[:limit]:
                steer[0] = add
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **sampling)
                outs.append(out[:, ids.shape[1]:])
            sync()
        return [np.asarray(o.cpu().numpy(), np.int32) for o in outs]

    return step


# -- timing and figures --------------------------------------------------------------------------------------

def warm(step, **kwargs) -> float:
    """Seconds of one untimed call (compilation, first-call set-up)."""
    return time_fn(lambda: step(**kwargs), iters=1, warmup=0)["median"]


def read_transcripts(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]


def choice_agreement(records: list[dict], scores: dict) -> dict:
    """Both sides' choices and option scores compared; how far the steering moved emojax's choices: the share
    of steered samples choosing otherwise than the baseline on that scenario, and the mean absolute change of
    the margin log P(A) - log P(B) (nats)."""
    same, diffs, baseline = 0, [], {}
    for r in records:
        opts = r["choice"]["picks_a"]["options"]
        ours = scores[(r["condition"], r["scenario"])]
        same += r["choice"]["picks_a"]["chosen"] == max(ours, key=ours.get)
        diffs += [abs(opts[label]["logp"] - ours[label]) for label in opts]
        if r["kind"] == "baseline":
            baseline[r["scenario"]] = r
    steered = [r for r in records if r["kind"] == "steer"]

    def margin(r):
        opts = r["choice"]["picks_a"]["options"]
        return opts["A"]["logp"] - opts["B"]["logp"]

    changed = [r["choice"]["picks_a"]["chosen"] != baseline[r["scenario"]]["choice"]["picks_a"]["chosen"]
               for r in steered]
    shifts = [abs(margin(r) - margin(baseline[r["scenario"]])) for r in steered]
    return {"agreement": same / len(records), "max_abs_logp_diff": max(diffs),
            "steered_changed": statistics.fmean(changed) if steered else None,
            "steered_margin_shift": statistics.fmean(shifts) if steered else None}


def summary(rounds: dict, n: int) -> dict:
    emo = [r["median"] for r in rounds["emojax"]]
    base = [r["median"] for r in rounds["transformers"]]
    ratios = [b / e for e, b in zip(emo, base)]
    emo_s, base_s = statistics.median(emo), statistics.median(base)
    return {"emojax": n / emo_s, "baseline": n / base_s, "ratio": base_s / emo_s, "round_ratios": ratios,
            "median_round_ratio": statistics.median(ratios), "emojax_median_s": emo_s, "baseline_median_s": base_s,
            "emojax_foreign_cores": max(r["foreign_cores"] or 0 for r in rounds["emojax"]),
            "baseline_foreign_cores": max(r["foreign_cores"] or 0 for r in rounds["transformers"])}


def run_choice(args, common: dict, lm, bank, model, steer, config, root: Path) -> dict:
    from emojax.experiment import Experiment

    plan = Experiment(dataclasses.replace(config, out=str(root / "plan")), lm=lm, bank=bank)
    samples = len(plan.conditions) * len(plan.scenarios)
    emo_step = emojax_side(config, lm, bank, None, root)
    base_step, n_seqs = transformers_choice(model, steer, plan, args.batch, args.device)
    log(f"  choice: {len(plan.conditions)} conditions x {len(plan.scenarios)} scenarios = {samples} samples, "
        f"{n_seqs} sequences, batch {args.batch}")
    compile_s, base_warm_s = warm(emo_step, scenarios=1), warm(base_step, limit=1)
    traces = lm.trace_count
    rounds = timed_rounds({"emojax": emo_step, "transformers": base_step}, iters=1, rounds=args.rounds, warmup=0)
    agree = choice_agreement(read_transcripts(rounds["emojax"][0]["output"][0]), rounds["transformers"][0]["output"])
    fig = summary(rounds, samples)
    lengths = [len(plan.tokenizer.encode_prompt(plan.suite.prompt(s, plan.tokenizer))) for s in plan.scenarios]
    return {"bench": "experiment_choice", **common, "emojax": fig.pop("emojax"), "baseline": fig.pop("baseline"),
            "ratio": fig.pop("ratio"), "unit": "samples/s", "agreement": agree.pop("agreement"),
            "conditions": len(plan.conditions), "scenarios": len(plan.scenarios), "samples": samples,
            "sequences": n_seqs, "prompt_tokens_mean": statistics.fmean(lengths),
            "emojax_compile_s": compile_s, "baseline_warmup_s": base_warm_s,
            "emojax_retraces_timed": lm.trace_count - traces, **agree, **fig}


def run_generate(args, common: dict, lm, bank, model, steer, config, root: Path) -> dict:
    import numpy as np

    from emojax.experiment import Experiment

    plan = Experiment(dataclasses.replace(config, out=str(root / "plan")), lm=lm, bank=bank)
    samples = len(plan.conditions) * len(plan.scenarios) * plan.samples
    decoder = make_recording_decoder(lm)
    emo_step = emojax_side(config, lm, bank, decoder, root)
    base_step = transformers_generate(model, steer, plan, args.batch, args.new_tokens, args.greedy, args.seed,
                                      args.device)
    log(f"  generate: {len(plan.conditions)} conditions x {len(plan.scenarios)} scenarios x {plan.samples} samples "
        f"= {samples} replies of {args.new_tokens} tokens, {'greedy' if args.greedy else 'temperature 1.0'}, "
        f"batch {args.batch}")
    compile_s, base_warm_s = warm(emo_step, scenarios=1), warm(base_step, limit=1)
    traces = decoder.trace_count
    rounds = timed_rounds({"emojax": emo_step, "transformers": base_step}, iters=1, rounds=args.rounds, warmup=0)
    out, emo_tokens = rounds["emojax"][0]["output"]
    base_tokens = rounds["transformers"][0]["output"]
    lengths = {r["n_tokens"] for r in read_transcripts(out)}
    if lengths != {args.new_tokens}:
        raise SystemExit(f"emojax generated {sorted(lengths)} tokens per reply, not {args.new_tokens} alone")
    if {o.shape[1] for o in base_tokens} != {args.new_tokens}:
        raise SystemExit(f"transformers generated {sorted({o.shape[1] for o in base_tokens})} tokens per reply")
    agreement = None
    if args.greedy:
        equal = [np.mean(e[:len(b)] == b) * len(b) for e, b in zip(emo_tokens, base_tokens)]
        agreement = float(sum(equal) / sum(len(b) for b in base_tokens))
    fig = summary(rounds, samples)
    tokens = samples * args.new_tokens
    return {"bench": "experiment_generate", **common, "emojax": fig.pop("emojax"), "baseline": fig.pop("baseline"),
            "ratio": fig.pop("ratio"), "unit": "samples/s", "agreement": agreement,
            "sampling": "greedy" if args.greedy else "temperature 1.0",
            "conditions": len(plan.conditions), "scenarios": len(plan.scenarios), "samples_per_scenario": plan.samples,
            "samples": samples, "new_tokens": args.new_tokens,
            "emojax_tok_s": tokens / fig["emojax_median_s"], "baseline_tok_s": tokens / fig["baseline_median_s"],
            "emojax_compile_s": compile_s, "baseline_warmup_s": base_warm_s,
            "emojax_retraces_timed": decoder.trace_count - traces, **fig}


def main(argv=None) -> None:
    args = parse_args(argv)
    shape, cfg = start_against_torch(args.device, args.model_shape)
    import torch

    import emojax
    from emojax.experiment import ExperimentConfig

    layer = cfg.n_layers // 2
    with tempfile.TemporaryDirectory(prefix="bench_experiment-") as tmp:
        root = Path(tmp)
        weights = root / "model"
        emojax.random_model(cfg, dtype="float32", seed=args.seed).save(weights)
        lm = emojax.load_model(weights, dtype="float32")
        choice_path = write_suite(root, choice_suite(args.scenarios))
        gen_path = write_suite(root, generate_suite(args.gen_scenarios, args.samples, args.new_tokens,
                                                    0.0 if args.greedy else 1.0))
        bank, norm = make_bank(lm, layer, choice_path, args.seed)
        model, steer = load_transformers(str(weights), layer, args.device)
        info = env_info()
        common = {"shape": shape, "model_shape": args.model_shape, "device": args.device, "dtype": "float32",
                  "batch": args.batch, "layer": layer, "concepts": len(CONCEPTS), "strengths": list(STRENGTHS),
                  "strength_unit": "norm", "resid_norm": norm, "rounds": args.rounds,
                  "threads": torch.get_num_threads(),
                  **{k: info[k] for k in ("jax_version", "torch_version", "transformers_version", "jax_backend",
                                          "jax_device", "cpu_count") if k in info}}
        log(f"bench_experiment: {shape} (float32, {args.device}), steering at residual index {layer} (mean norm "
            f"{norm:.3g}), strengths {list(STRENGTHS)} x norm, {len(CONCEPTS)} concepts")
        base = dict(concepts=CONCEPTS, strengths=STRENGTHS, layers=(layer,), unit="norm", batch_size=args.batch,
                    seed=args.seed)
        for task in args.only:
            if task == "choice":
                config = ExperimentConfig(suite=choice_path, out=str(root / "unused"), **base)
                record = run_choice(args, common, lm, bank, model, steer, config, root)
            else:
                config = ExperimentConfig(suite=gen_path, out=str(root / "unused"), samples=args.samples,
                                          max_new_tokens=args.new_tokens, **base)
                record = run_generate(args, common, lm, bank, model, steer, config, root)
            agreement = "n/a (sampled)" if record["agreement"] is None else f"{record['agreement']:.3f}"
            log(f"  {record['bench']}: emojax {record['emojax']:,.1f} samples/s (warm-up with compile "
                f"{record['emojax_compile_s']:.1f}s), transformers {record['baseline']:,.1f} samples/s, ratio "
                f"{record['ratio']:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in record['round_ratios'])}), "
                f"agreement {agreement}")
            emit(record)


if __name__ == "__main__":
    main()
