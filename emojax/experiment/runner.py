"""Running an experiment: every condition x scenario (x sample) in resumable shards.

    run_experiment(config, log=log)  ->  out/results.json, out/transcripts.jsonl, out/experiment.png

Conditions: the baseline, every concept x strength x layer (the steering vector added at that layer, strength in
the config's unit), and each ablated concept (its unit direction projected out). Rows:
    choice   (condition, scenario): one forward per option of each forced-choice outcome (log-probabilities of
             the option's tokens after the prompt; no sampling)
    generate (condition, scenario, sample): one sampled reply, scored by rules and the judge
The baseline and every steering condition are one group: its rows are ordered (scenario, sample, condition), so a
batch holds whole strength sweeps, each row with its own strengths (one compiled program for every strength,
seed and scenario of a bucket). An ablation has its own group (its projection is per batch). Groups are cut into
shards of `shard_rows` rows; a shard is written whole (an atomic rename) and a rerun skips it, so a killed run
resumes where it stopped and ends with the same tables. A sampled row's randomness comes from its own seed,
crc32(seed | condition | scenario | sample), never from its batch neighbours.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from emojax.digest import digest
from emojax.errors import ConfigError, InputError
from emojax.experiment.config import ExperimentConfig
from emojax.experiment.suite import Suite, fill, load_suite
from emojax.fileio import write_json, write_text
from emojax.locks import writer_lock
from emojax.models.interventions import Interventions
from emojax.progress import progress_bar
from emojax.tokenizer import left_pad

FORMAT = "emojax-experiment-1"
MIN_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Condition:
    id: str
    kind: str  # baseline | steer | ablate
    concept: str = ""
    strength: float = 0.0
    layer: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def make_conditions(config: ExperimentConfig, layers: tuple[int, ...]) -> list[Condition]:
    out = [Condition("baseline", "baseline")]
    tag = len(layers) > 1
    for concept in config.concepts:
        for layer in layers:
            for s in config.strengths:
                out.append(Condition(f"{concept}{s:+g}" + (f"@{layer}" if tag else ""), "steer", concept, float(s),
                                     layer))
    for concept in config.ablate:
        for layer in layers:
            out.append(Condition(f"ablate:{concept}" + (f"@{layer}" if tag else ""), "ablate", concept, 0.0, layer))
    return out


def ending_logprobs(lm, seqs: list[tuple[list[int], int]], batch_size: int, bucket: Callable[[int, list[int]], int],
                    interventions: Callable[[list[int]], Interventions | None] = lambda part: None) -> list[float]:
    """log P(the last n tokens | the tokens before them) of each (ids, n) of `seqs` (a forced-choice option after
    its prompt), in batches of `batch_size` rows left-padded to bucket(longest, rows of the batch) columns.
    interventions(rows of the batch): the batch's steering (padded to batch_size rows), or None."""
    out = []
    for start in range(0, len(seqs), batch_size):
        part = list(range(start, min(start + batch_size, len(seqs))))
        T = bucket(max(len(seqs[i][0]) for i in part), part)
        tokens, mask = left_pad([seqs[i][0] for i in part], T, rows=batch_size)  # a fixed shape per bucket
        # Only the endings' columns are scored (left padding aligns them at the end); their span is bucketed
        # like T, so a suite compiles one program per (T, span) pair.
        span = min(1 << (max(seqs[i][1] for i in part) - 1).bit_length(), T - 1)
        logp = lm.token_logprobs(tokens, mask, interventions=interventions(part), last=span)
        out += [float(logp[b, T - seqs[i][1]:].sum()) for b, i in enumerate(part)]
    return out


def check_plan(out: Path, fingerprint: dict, what: str, key: str) -> None:
    """Writes out/plan.json (every setting that changes a row), or refuses a run whose settings differ from the
    ones `out` was started with, naming them: a resume must continue the same run."""
    plan, now = out / "plan.json", json.loads(json.dumps(fingerprint))
    if plan.is_file():
        saved = json.loads(plan.read_text())
        changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if changed:
            raise ConfigError(f"{out}: holds {what} with other settings ({', '.join(changed)} differ); use another "
                              f"{key}, or delete the folder to start over")
    else:
        write_json(plan, now, indent=1)


def reply_text(text: str) -> str:
    """A generated text cut where the study's frame starts the next turn ("\nHuman:"): the model writing the
    user's part is not its reply."""
    return text.split("\nHuman:")[0]


def cut_reply(tokenizer, ids: list[int]) -> tuple[str, int]:
    """(the reply in generated `ids`, cut by reply_text; how many of the ids it spans, at least one): the tokens a
    reply's readings are averaged over."""
    reply = reply_text(tokenizer.decode(ids))
    return reply, min(len(ids), max(1, len(tokenizer.encode(reply, add_special_tokens=False))))


def row_seed(seed: int, condition: str, scenario: str, sample: int) -> int:
    return zlib.crc32(f"{seed}|{condition}|{scenario}|{sample}".encode())


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str
    task: str  # choice | generate
    group: str  # "steer" or the ablation condition's id
    rows: tuple[tuple[int, int, int], ...]  # (condition, scenario, sample)


class Experiment:
    """One experiment's plan (conditions, scenarios, shards) and the model, bank and tokenizer it runs with."""

    def __init__(self, config: ExperimentConfig, lm=None, bank=None, judge=None, decoder=None):
        from emojax.concepts.bank import load_bank
        from emojax.concepts.layer import bank_layer
        from emojax.models.lm import load_model, tokenizer_for

        if not config.out:
            raise ConfigError("experiment.out is not set: name an output folder")
        self.config = config
        self.suite: Suite = load_suite(config.suite)
        self.outcomes = self._outcomes()
        if lm is None:
            if not config.model:
                raise ConfigError("experiment.model is not set: name the checkpoint to run")
            lm = load_model(config.model)
        self.lm = lm
        self._decoder = decoder  # built on first generation; pass one to share its compiled loop between runs
        self.tokenizer = tokenizer_for(lm)
        needs_bank = bool(config.concepts and config.strengths) or bool(config.ablate)
        if bank is None and needs_bank:
            if not config.bank:
                raise ConfigError("experiment.bank is not set, and the conditions steer or ablate concepts: name a "
                                  "concept bank, or set concepts=[] and ablate=[] for the baseline alone")
            bank = load_bank(config.bank)
        self.bank = bank
        if bank is not None:
            from emojax.steer.generate import check_bank_model

            check_bank_model(lm, bank)
            for concept in (*config.concepts, *config.ablate):
                bank.concept_index(concept)
        L = lm.config.n_layers
        layers = tuple(config.layers) or ((bank_layer(bank, L),) if bank is not None else ())
        if bank is not None:
            for layer in layers:
                bank.layer_index(layer)
        self.layers = layers
        self.conditions = make_conditions(config, layers) if needs_bank else [Condition("baseline", "baseline")]
        self.scenarios = self._scenarios()
        gen = self.suite.generation
        self.samples = config.samples or gen.samples
        self.max_new_tokens = config.max_new_tokens or gen.max_new_tokens
        self.temperature = gen.temperature if config.temperature is None else config.temperature
        self.top_p = config.top_p or gen.top_p
        self.judge = judge
        if judge is None and any(o.kind == "judge" for o in self.outcomes) and config.judge_url:
            from emojax.experiment.judge import Judge, JudgeSettings

            self.judge = Judge(JudgeSettings(url=config.judge_url, model=config.judge_model,
                                             api_key_env=config.judge_key_env,
                                             concurrency=config.judge_concurrency),
                               cache_dir=Path(config.out) / "judge_cache")
        self.shards = self._shards()
        self._vectors: dict = {}

    # -- the plan ---------------------------------------------------------------------------------------------

    def _outcomes(self):
        chosen = self.config.outcomes or tuple(o.name for o in self.suite.outcomes)
        outs = [self.suite.outcome(name) for name in chosen]
        if not self.config.judge_url:
            outs = [o for o in outs if o.kind != "judge"]  # reported as not measured (see results)
        if not outs:
            raise ConfigError(f"experiment.outcomes: nothing to measure in suite {self.suite.name!r} (judge outcomes "
                              "need experiment.judge_url)")
        return outs

    def _scenarios(self) -> list[dict]:
        return self.suite.sample(self.config.scenarios, self.config.seed)

    @property
    def tasks(self) -> list[str]:
        tasks = []
        if any(o.kind == "choice" for o in self.outcomes):
            tasks.append("choice")
        if any(o.sampled for o in self.outcomes):
            tasks.append("generate")
        return tasks

    def _groups(self) -> list[tuple[str, list[int]]]:
        steer = [i for i, c in enumerate(self.conditions) if c.kind != "ablate"]
        return [("steer", steer)] + [(c.id, [i]) for i, c in enumerate(self.conditions) if c.kind == "ablate"]

    def _shards(self) -> list[Shard]:
        shards = []
        for task in self.tasks:
            samples = range(self.samples) if task == "generate" else (0,)
            for g, (group, conds) in enumerate(self._groups()):
                rows = [(c, s, k) for s in range(len(self.scenarios)) for k in samples for c in conds]
                size = self.config.shard_rows
                for part in range(0, len(rows), size):
                    shards.append(Shard(f"{task}-{g:03d}-{part // size:05d}", task, group,
                                        tuple(rows[part:part + size])))
        return shards

    def fingerprint(self) -> dict:
        """Every setting that changes a row: a rerun with another is refused (a new out folder, or the run
        stage's move-aside)."""
        c = self.config
        bank = None if self.bank is None else (self.bank.info.get("tensors_sha256") or self.bank.source)
        return {"format": FORMAT, "suite": digest(dataclasses.asdict(self.suite) | {"source": ""}),
                "suite_name": self.suite.name, "model": self.lm.identity or self.lm.source, "bank": bank,
                "conditions": [x.to_json() for x in self.conditions], "scenarios": [s["id"] for s in self.scenarios],
                "outcomes": [o.name for o in self.outcomes], "unit": c.unit, "positions": c.positions,
                "samples": self.samples, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": c.seed, "batch_size": c.batch_size, "shard_rows": c.shard_rows,
                "judge": [c.judge_url, c.judge_model] if c.judge_url else None}

    # -- interventions ----------------------------------------------------------------------------------------

    def _vector(self, concept: str, layer: int) -> np.ndarray:
        from emojax.steer.interventions import bank_direction

        key = (concept, layer)
        if key not in self._vectors:
            self._vectors[key] = bank_direction(self.bank, concept, layer, self.config.unit)
        return self._vectors[key]

    def interventions(self, group: str, conds: list[int]) -> Interventions | None:
        """The batch's interventions: in the steer group one additive vector per (concept, layer) with each row's
        strength on its own condition's vector (0 elsewhere); in an ablation group the concept's direction
        projected out. conds: the condition of each row of the batch."""
        cfg = self.lm.config
        B = len(conds)
        if group != "steer":
            c = self.conditions[conds[0]]
            return Interventions.empty(B, cfg.n_layers, cfg.d_model).ablate(
                self._vector(c.concept, c.layer), layers=(c.layer,), positions=self.config.positions)
        entries = sorted({(c.concept, c.layer) for c in self.conditions if c.kind == "steer"})
        if not entries:
            return None
        iv = Interventions.empty(B, cfg.n_layers, cfg.d_model)
        for concept, layer in entries:
            s = [self.conditions[i].strength if (self.conditions[i].concept, self.conditions[i].layer)
                 == (concept, layer) else 0.0 for i in conds]
            iv = iv.add(self._vector(concept, layer), layers=(layer,), strengths=np.asarray(s, np.float32),
                        positions=self.config.positions)
        return iv

    # -- running ----------------------------------------------------------------------------------------------

    def run(self, log: Callable[[str], None] | None = None, show_progress: bool = True,
            stop_after: int | None = None) -> dict:
        """Runs every shard not yet written, then the tables. stop_after: run at most this many shards and
        return None (tests and batch schedulers)."""
        from emojax.experiment.results import summarise

        out = Path(self.config.out)
        with writer_lock(out, "experiment output"):
            self._check_plan(out)
            todo = [s for s in self.shards if not (out / "shards" / f"{s.name}.jsonl").is_file()]
            if log:
                log(f"experiment {self.suite.name}: {len(self.conditions)} conditions x {len(self.scenarios)} "
                    f"scenarios, tasks {self.tasks}, {len(self.shards)} shards ({len(todo)} to run)")
            rows_left = sum(len(s.rows) for s in todo)
            with progress_bar(f"experiment {self.suite.name}", rows_left, enabled=show_progress) as update:
                for i, shard in enumerate(todo):
                    if stop_after is not None and i >= stop_after:
                        return None
                    records = self.run_shard(shard)
                    write_text(out / "shards" / f"{shard.name}.jsonl",
                               "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
                    update(advance=len(shard.rows), status=shard.name)
            records = self.read_records(out)
            self.rejudge(out, records)
            results = summarise(self, records)
            write_text(out / "transcripts.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            write_json(out / "results.json", results, indent=1)
            from emojax.experiment.results import figure

            figure(results, out / "experiment.png")
        return results

    def _check_plan(self, out: Path) -> None:
        check_plan(out, self.fingerprint(), "an experiment", "experiment.out")

    def read_records(self, out: Path) -> list[dict]:
        records = []
        for shard in self.shards:
            path = out / "shards" / f"{shard.name}.jsonl"
            for n, line in enumerate(path.read_text().splitlines()):
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise InputError(f"{path}: line {n + 1} is not JSON ({e}); delete the file to rerun that "
                                     "shard") from None
        return records

    def run_shard(self, shard: Shard) -> list[dict]:
        if shard.task == "choice":
            return self._choice(shard)
        records = self._generate(shard)
        self._judge(records)
        return records

    def _base(self, cond: int, scenario: int, sample: int | None) -> dict:
        c, s = self.conditions[cond], self.scenarios[scenario]
        out = {"suite": self.suite.name, "condition": c.id, "kind": c.kind, "concept": c.concept,
               "strength": c.strength, "layer": c.layer, "scenario": s["id"]}
        if sample is not None:
            out |= {"sample": sample, "seed": row_seed(self.config.seed, c.id, s["id"], sample)}
        return out

    def _prompt_ids(self, scenario: int) -> list[int]:
        return self.tokenizer.encode_prompt(self.suite.prompt(self.scenarios[scenario], self.tokenizer))

    def _choice(self, shard: Shard) -> list[dict]:
        """Forced choice: log P(option tokens | prompt) under each row's condition, raw and per token."""
        choice = [o for o in self.outcomes if o.kind == "choice"]
        seqs = []  # (row, outcome, label, ids, n_option)
        for r, (_, s, _) in enumerate(shard.rows):
            prompt = self._prompt_ids(s)
            for o in choice:
                for label, text in o.options.items():
                    option = self.tokenizer.encode(fill(text, self.scenarios[s]), add_special_tokens=False)
                    if not option:
                        raise InputError(f"{self.suite.source}: outcome {o.name} option {label!r} encodes to no "
                                         f"tokens (scenario {self.scenarios[s]['id']!r})")
                    seqs.append((r, o.name, label, prompt + option, len(option)))
        B = self.config.batch_size

        def interventions(part: list[int]) -> Interventions | None:
            conds = [shard.rows[seqs[i][0]][0] for i in part]
            return self.interventions(shard.group, conds + [conds[0]] * (B - len(conds)))

        def bucket(n: int, part: list[int]) -> int:
            return self._bucket(n, shard, seqs[part[0]][0])

        logps = ending_logprobs(self.lm, [(x[3], x[4]) for x in seqs], B, bucket, interventions)
        scores = {(r, name, label): (lp, n) for (r, name, label, _, n), lp in zip(seqs, logps)}
        records = []
        for r, (c, s, _) in enumerate(shard.rows):
            rec = self._base(c, s, None) | {"choice": {}, "outcomes": {}}
            for o in choice:
                opts = {label: {"logp": scores[(r, o.name, label)][0], "n_tokens": scores[(r, o.name, label)][1]}
                        for label in o.options}
                raw = max(opts, key=lambda k: opts[k]["logp"])
                norm = max(opts, key=lambda k: opts[k]["logp"] / opts[k]["n_tokens"])
                lp = np.array([v["logp"] for v in opts.values()])
                p = np.exp(lp - lp.max())
                p_pos = float(p[list(opts).index(o.positive)] / p.sum())
                rec["choice"][o.name] = {"options": opts, "chosen": raw, "chosen_norm": norm, "p_positive": p_pos}
                if o.compete:
                    rec["choice"][o.name]["items"] = {k: fill(v, self.scenarios[s]) for k, v in o.compete.items()}
                rec["outcomes"][o.name] = int(raw == o.positive)
                rec["outcomes"][f"{o.name}_norm"] = int(norm == o.positive)
            records.append(rec)
        return records

    def _bucket(self, n: int, shard: Shard, row: int) -> int:
        T = max(MIN_BUCKET, 1 << (n - 1).bit_length())
        limit, _ = self.lm.config.position_limit
        if limit and n > limit:
            c, s, _ = shard.rows[row]
            raise InputError(f"{self.suite.source}: scenario {self.scenarios[s]['id']!r} is {n} tokens with its "
                             f"options, past the model's {limit} positions")
        return min(T, limit) if limit else T

    def _generate(self, shard: Shard) -> list[dict]:
        from emojax.models.lm import stop_tokens
        from emojax.steer.decode import Decoder, fixed_batches
        from emojax.steer.sampling import Sampling

        if self._decoder is None:
            self._decoder = Decoder(self.lm)
        B = self.config.batch_size
        rows = list(shard.rows)
        records = []
        for indices, padded_indices in fixed_batches(len(rows), B):
            part, padded = [rows[i] for i in indices], [rows[i] for i in padded_indices]
            tokens, mask = left_pad([self._prompt_ids(s) for _, s, _ in padded])
            seeds = [row_seed(self.config.seed, self.conditions[c].id, self.scenarios[s]["id"], k)
                     for c, s, k in padded]
            gen = self._decoder.generate(
                tokens, mask, max_new_tokens=self.max_new_tokens,
                interventions=self.interventions(shard.group, [c for c, _, _ in padded]),
                sampling=Sampling.make(B, self.temperature, top_p=self.top_p, seed=seeds),
                key=jax.random.key(self.config.seed), stop_tokens=stop_tokens(self.lm))
            for b, (c, s, k) in enumerate(part):
                text = self.tokenizer.decode(gen.generated(b))
                reply = reply_text(text)
                rec = self._base(c, s, k) | {"text": text, "reply": reply, "n_tokens": len(gen.generated(b)),
                                             "outcomes": {}, "judge": {}}
                for o in self.outcomes:
                    if o.kind == "rule":
                        rec["outcomes"][o.name] = o.rule(reply)
                records.append(rec)
        return records

    def _judge(self, records: list[dict], only_failed: bool = False) -> bool:
        """Scores replies with the judge outcomes; a failure is kept in the record (value None, its error).
        Returns whether anything was (re)judged."""
        judged = [o for o in self.outcomes if o.kind == "judge"]
        if not judged or self.judge is None:
            return False
        changed = False
        for o in judged:
            todo = [r for r in records if not only_failed or (r["judge"].get(o.name, {}).get("error"))]
            if not todo:
                continue
            scen = {s["id"]: s for s in self.scenarios}
            prompts = [fill(o.rubric, {**scen[r["scenario"]], "reply": r["reply"],
                                       "prompt": self.suite.user_text(scen[r["scenario"]])}) for r in todo]
            for r, result in zip(todo, self.judge.score(prompts, o.scale)):
                r["judge"][o.name] = result.to_json()
                r["outcomes"][o.name] = None if result.score is None else int(result.score >= o.threshold)
            changed = True
        return changed

    def rejudge(self, out: Path, records: list[dict]) -> None:
        """Retries judge failures of finished shards (successes come from the judge's cache) and rewrites them."""
        failed = [r for r in records if any(v.get("error") for v in r.get("judge", {}).values())]
        if not failed or self.judge is None:
            return
        self._judge(failed, only_failed=True)
        by_shard: dict = {}
        for shard in self.shards:
            for c, s, k in shard.rows:
                by_shard[(self.conditions[c].id, self.scenarios[s]["id"], k if shard.task == "generate" else None,
                          shard.task)] = shard.name
        rewrite = {by_shard[(r["condition"], r["scenario"], r.get("sample"), "generate")] for r in failed}
        for name in sorted(rewrite):
            rows = [r for r in records if r.get("sample") is not None
                    and by_shard[(r["condition"], r["scenario"], r["sample"], "generate")] == name]
            write_text(out / "shards" / f"{name}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def run_experiment(config: ExperimentConfig, log: Callable[[str], None] | None = None, show_progress: bool = True,
                   lm=None, bank=None, judge=None, decoder=None) -> dict:
    return Experiment(config, lm=lm, bank=bank, judge=judge, decoder=decoder).run(log=log,
                                                                                    show_progress=show_progress)
