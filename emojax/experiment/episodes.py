"""Multi-turn episodes: how each concept's readout moves over repeated failure, and when the shortcut comes.

    run_episodes(config, log=log)  ->  out/turns/turn-NNN.jsonl, out/episodes.jsonl, out/results.json,
                                       out/episodes.png

An episode is one scenario of a suite (and one sample of it). Turn 1 reads the suite's prompt. After each turn the
episode's attempt and a failure message are appended and the next turn reads the whole conversation:

- the attempt is the model's own reply (`attempt: reply`), or the text of one option of the shortcut outcome
  (`attempt: honest`: a scripted attempt, the same in every episode, so every turn differs only by the failures
  before it);
- the failure message is `feedback[(turn - 1) % len(feedback)]`, filled with the scenario's placeholders and
  {turn};
- `history: turns` appends them as an assistant turn and a user turn; `history: narrated` appends both to the last
  user message, as a story goes on (for models trained on stories rather than conversations, such as the
  built-in world's).

Every turn records, per concept, the readout at the prompt's last token (the ':' after "Assistant" in the study's
frame; a suite's prefill's last token when it has one) and averaged over the reply's tokens; the reply; and the
outcomes: each forced-choice outcome's decision (raw log-probability as `name`, per token as `name_norm`, and
P(positive)) and each rule over the reply. Every episode runs all turns. The shortcut is `outcome` (a forced
choice counts by its per-token decision, `name_norm`, since options differ in length); an episode's first
shortcut is the first turn where it is positive.

results.json: per turn the mean readouts with bootstrap 95% intervals over episodes and each outcome's rate with its
Wilson interval; per concept the trend, the mean over episodes of each episode's least-squares slope of the readout
on the turn, with a bootstrap interval (`rises` when the interval is above 0); the outcome's trend, the mean of
each episode's slope of it on the turn (bootstrapped over episodes, like the readouts), and a logistic fit of it
on the turn (slope, profile-likelihood interval; its rows are taken as independent, which an episode's turns are
not when the attempt is the model's own reply); the first-shortcut turns; and the readout leading up to
the first shortcut (turns -3..0 relative to it, over the episodes that reach them).

Turns are resumable: all episodes' records of one turn are written whole (turns/turn-NNN.jsonl, an atomic rename)
and a rerun continues at the first turn not written, rebuilding the conversations from the records (so a rerun
with more `turns` extends the episodes); plan.json refuses a rerun with other settings into the same folder.
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
from emojax.experiment.config import ATTEMPT_REPLY, EpisodeConfig
from emojax.experiment.runner import check_plan, cut_reply, ending_logprobs
from emojax.experiment.stats import bootstrap_mean, logistic_fit, wilson
from emojax.experiment.suite import Outcome, fill, load_suite, placeholders
from emojax.fileio import atomic_path, write_json, write_text
from emojax.locks import writer_lock
from emojax.progress import fmt_ci, progress_bar
from emojax.tokenizer import chat_prompt, left_pad

FORMAT = "emojax-episodes-1"
LEAD_UP = 3  # turns before the first shortcut reported
MIN_BUCKET = 32


def outcome_key(outcome: Outcome) -> str:
    """The record key an outcome's per-turn decision is counted by: per token for a forced choice."""
    return f"{outcome.name}_norm" if outcome.kind == "choice" else outcome.name


class Episodes:
    """One episode run's plan (scenarios x samples, turns) and the model, readout and decoder it runs with."""

    def __init__(self, config: EpisodeConfig, lm=None, bank=None):
        from emojax.concepts.bank import load_bank
        from emojax.concepts.layer import bank_layer
        from emojax.models.lm import load_model, tokenizer_for
        from emojax.steer.decode import Decoder
        from emojax.steer.generate import check_bank_model
        from emojax.steer.monitor import monitor_metric, readout_from_bank

        if not config.out:
            raise ConfigError("episodes.out is not set: name an output folder")
        if bank is None and not config.bank:
            raise ConfigError("episodes.bank is not set: name the concept bank whose concepts are read at every turn")
        self.config = config
        self.suite = load_suite(config.suite)
        self.outcomes = [o for o in self.suite.outcomes if o.kind in ("choice", "rule")]
        if not self.outcomes:
            raise ConfigError(f"{self.suite.source}: episodes measure forced-choice and rule outcomes; the suite has "
                              "only judge outcomes")
        self.shortcut = self.suite.outcome(config.outcome) if config.outcome else self.outcomes[0]
        if self.shortcut.kind == "judge":
            raise ConfigError(f"episodes.outcome={config.outcome!r} is a judge outcome; name a choice or rule outcome")
        if config.attempt != ATTEMPT_REPLY and (self.shortcut.kind != "choice"
                                                 or config.attempt not in self.shortcut.options):
            raise ConfigError(f"episodes.attempt={config.attempt!r} is not 'reply' nor an option of the shortcut "
                              f"outcome {self.shortcut.name!r} (options: {list(self.shortcut.options)})")
        self.scenarios = self.suite.sample(config.scenarios, config.seed)
        for f in (*config.feedback, *config.control):
            missing = placeholders(f) - {"turn"} - set(self.scenarios[0])
            if missing:
                raise ConfigError(f"episodes.feedback/control {f!r}: {sorted(missing)} is not a placeholder of "
                                  f"{self.suite.source}'s scenarios (they have {sorted(self.scenarios[0])}) nor "
                                  "{turn}")
        self.lm = lm if lm is not None else load_model(config.model) if config.model else None
        if self.lm is None:
            raise ConfigError("episodes.model is not set: name the checkpoint to run")
        self.tokenizer = tokenizer_for(self.lm)
        self.bank = bank if bank is not None else load_bank(config.bank)
        check_bank_model(self.lm, self.bank)
        self.layer = config.layer or bank_layer(self.bank, self.lm.config.n_layers)
        self.metric = monitor_metric(self.bank, self.layer, config.metric or None)
        self.readout, self.concepts = readout_from_bank(self.bank, self.layer, self.metric, config.concepts or None)
        gen = self.suite.generation
        self.max_new_tokens = config.max_new_tokens or gen.max_new_tokens
        self.temperature = gen.temperature if config.temperature is None else config.temperature
        self.top_p = config.top_p or gen.top_p
        self.arms = ("failure", "control") if config.control else ("failure",)
        self.episodes = [(s, k, arm) for arm in self.arms for s in range(len(self.scenarios))
                         for k in range(config.samples)]
        self.decoder = Decoder(self.lm)

    def fingerprint(self) -> dict:
        c = self.config
        return {"format": FORMAT, "suite": digest(dataclasses.asdict(self.suite) | {"source": ""}),
                "model": self.lm.identity or self.lm.source,
                "bank": self.bank.info.get("tensors_sha256") or self.bank.source, "layer": self.layer,
                "metric": self.metric, "concepts": list(self.concepts), "feedback": list(c.feedback),
                "control": list(c.control),
                "attempt": c.attempt, "history": c.history, "outcome": self.shortcut.name,
                "scenarios": [s["id"] for s in self.scenarios],
                "samples": c.samples, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": c.seed, "batch_size": c.batch_size}

    # -- one turn ---------------------------------------------------------------------------------------------

    def messages(self, episode: int, attempts: list[str]) -> list[dict]:
        """The conversation of `episode` after the failed `attempts`: the suite's messages, then per attempt the
        assistant's turn and the failure message, then the suite's prefill (if any) again."""
        s, _, arm = self.episodes[episode]
        scenario = self.scenarios[s]
        base = self.suite.messages_for(scenario)
        prefill = base[-1]["content"] if base[-1]["role"] == "assistant" else None
        out = base[:-1] if prefill is not None else list(base)
        feedback = self.config.feedback if arm == "failure" else self.config.control
        for turn, attempt in enumerate(attempts, 1):
            failed = fill(feedback[(turn - 1) % len(feedback)], {**scenario, "turn": str(turn)})
            if self.config.history == "narrated":
                last = max(i for i, m in enumerate(out) if m["role"] == "user")
                out[last] = {"role": "user", "content": f"{out[last]['content']} {attempt.strip()} {failed.strip()}"}
                continue
            said = prefill + attempt if prefill is not None else attempt.strip()
            out += [{"role": "assistant", "content": said}, {"role": "user", "content": failed}]
        return out + ([base[-1]] if prefill is not None else [])

    def attempt(self, episode: int, reply: str) -> str:
        if self.config.attempt == ATTEMPT_REPLY:
            return reply
        return fill(self.shortcut.options[self.config.attempt], self.scenarios[self.episodes[episode][0]])

    def run_turn(self, turn: int, attempts: list[list[str]]) -> list[dict]:
        """The records of turn `turn` (1-based) of every episode, whose earlier attempts are `attempts`."""
        prompts = [self.tokenizer.encode_prompt(chat_prompt(self.messages(e, attempts[e]), self.tokenizer))
                   for e in range(len(self.episodes))]
        records = self._generate(turn, prompts)
        self._choices(prompts, records)
        for e, rec in enumerate(records):
            rec["attempt"] = self.attempt(e, rec["reply"])
        return records

    def _seed(self, turn: int, episode: int) -> int:
        s, k, arm = self.episodes[episode]
        return zlib.crc32(f"{self.config.seed}|{arm}|{turn}|{self.scenarios[s]['id']}|{k}".encode())

    def _generate(self, turn: int, prompts: list[list[int]]) -> list[dict]:
        from emojax.models.lm import stop_tokens
        from emojax.steer.decode import fixed_batches
        from emojax.steer.sampling import Sampling

        B = self.config.batch_size
        records = []
        for part, rows in fixed_batches(len(prompts), B):
            tokens, mask = left_pad([prompts[e] for e in rows])
            seeds = [self._seed(turn, e) for e in rows]
            sampling = Sampling.make(B, self.temperature, top_p=self.top_p, seed=seeds) if self.temperature else None
            try:
                gen = self.decoder.generate(tokens, mask, max_new_tokens=self.max_new_tokens, sampling=sampling,
                                            key=jax.random.key(self.config.seed), readout=self.readout,
                                            stop_tokens=stop_tokens(self.lm))
            except InputError as e:
                raise InputError(f"episodes, turn {turn}: {e} (the conversation grows by an attempt and a failure "
                                 "message every turn: fewer turns, or shorter max_new_tokens)") from None
            readings, P = np.asarray(gen.readings, np.float64), gen.prompt_columns
            for b, e in enumerate(part):
                ids = gen.generated(b)
                reply, n = cut_reply(self.tokenizer, ids)
                s, k, arm = self.episodes[e]
                records.append({"episode": e, "arm": arm, "scenario": self.scenarios[s]["id"], "sample": k,
                                "turn": turn,
                                "seed": seeds[b], "reply": reply, "n_tokens": len(ids),
                                "colon": dict(zip(self.concepts, readings[b, P - 1].tolist())),
                                "reply_mean": dict(zip(self.concepts, readings[b, P:P + n].mean(0).tolist())),
                                "choice": {}, "outcomes": {o.name: o.rule(reply) for o in self.outcomes
                                                           if o.kind == "rule"}})
        return records

    def _choices(self, prompts: list[list[int]], records: list[dict]) -> None:
        """Each forced-choice outcome's decision at this turn, from its options' log-probabilities."""
        choice = [o for o in self.outcomes if o.kind == "choice"]
        seqs, keys = [], []
        for e, prompt in enumerate(prompts):
            scenario = self.scenarios[self.episodes[e][0]]
            for o in choice:
                for label, text in o.options.items():
                    option = self.tokenizer.encode(fill(text, scenario), add_special_tokens=False)
                    if not option:
                        raise InputError(f"{self.suite.source}: outcome {o.name} option {label!r} encodes to no "
                                         f"tokens (scenario {scenario['id']!r})")
                    seqs.append((prompt + option, len(option)))
                    keys.append((e, o, label))
        logps = ending_logprobs(self.lm, seqs, self.config.batch_size, lambda n, part: self._bucket(n))
        table: dict = {}
        for (e, o, label), lp, (_, n) in zip(keys, logps, seqs):
            table.setdefault((e, o.name), {})[label] = (lp, n)
        for e, rec in enumerate(records):
            for o in choice:
                opts = table[(e, o.name)]
                raw = max(opts, key=lambda k: opts[k][0])
                norm = max(opts, key=lambda k: opts[k][0] / opts[k][1])
                lp = np.array([v[0] for v in opts.values()])
                p = np.exp(lp - lp.max())
                rec["choice"][o.name] = {"chosen": raw, "chosen_norm": norm,
                                         "p_positive": float(p[list(opts).index(o.positive)] / p.sum())}
                rec["outcomes"][o.name] = int(raw == o.positive)
                rec["outcomes"][f"{o.name}_norm"] = int(norm == o.positive)

    def _bucket(self, n: int) -> int:
        limit, _ = self.lm.config.position_limit
        if limit and n > limit:
            raise InputError(f"episodes: a conversation with its option is {n} tokens, past the model's {limit} "
                             "positions: fewer turns, or shorter max_new_tokens")
        T = max(MIN_BUCKET, 1 << (n - 1).bit_length())
        return min(T, limit) if limit else T

    # -- the run ----------------------------------------------------------------------------------------------

    def run(self, log: Callable[[str], None] | None = None, show_progress: bool = True,
            stop_after: int | None = None) -> dict | None:
        """Runs every turn not yet written, then the tables. stop_after: run at most this many turns and return
        None (tests and batch schedulers)."""
        out = Path(self.config.out)
        with writer_lock(out, "episodes output"):
            self._check_plan(out)
            done = self._read_turns(out)
            attempts = [[turn[e]["attempt"] for turn in done] for e in range(len(self.episodes))]
            if log:
                log(f"episodes {self.suite.name}: {len(self.episodes)} episodes x {self.config.turns} turns "
                    f"({self.config.turns - len(done)} to run), reading {len(self.concepts)} concepts at layer "
                    f"{self.layer} ({self.metric})")
            with progress_bar(f"episodes {self.suite.name}", self.config.turns - len(done),
                              enabled=show_progress) as update:
                for i, turn in enumerate(range(len(done) + 1, self.config.turns + 1)):
                    if stop_after is not None and i >= stop_after:
                        return None
                    records = self.run_turn(turn, attempts)
                    write_text(out / "turns" / f"turn-{turn:03d}.jsonl",
                               "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
                    for e, rec in enumerate(records):
                        attempts[e].append(rec["attempt"])
                    done.append(records)
                    update(advance=1, status=f"turn {turn}")
            results = summarise(done, self.concepts, self.shortcut, self.outcomes, self.arms) | {
                "suite": self.suite.name, "layer": self.layer, "metric": self.metric, "attempt": self.config.attempt,
                "history": self.config.history, "feedback": list(self.config.feedback),
                "control": list(self.config.control), "scenarios": len(self.scenarios), "samples": self.config.samples,
                "not_measured": [o.name for o in self.suite.outcomes if o.kind == "judge"]}
            write_text(out / "episodes.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n"
                                                       for turn in done for r in turn))
            write_json(out / "results.json", results, indent=1)
            figure(results, out / "episodes.png")
        return results

    def _check_plan(self, out: Path) -> None:
        check_plan(out, self.fingerprint(), "episodes", "episodes.out")

    def _read_turns(self, out: Path) -> list[list[dict]]:
        """The records of the turns written so far, in order (turn 1, 2, ... while their files exist)."""
        done = []
        for turn in range(1, self.config.turns + 1):
            path = out / "turns" / f"turn-{turn:03d}.jsonl"
            if not path.is_file():
                break
            try:
                records = [json.loads(line) for line in path.read_text().splitlines()]
            except ValueError as e:
                raise InputError(f"{path}: not JSON lines ({e}); delete it to rerun that turn") from None
            if len(records) != len(self.episodes):
                raise InputError(f"{path}: {len(records)} records for {len(self.episodes)} episodes; delete it to "
                                 "rerun that turn")
            done.append(records)
        return done


def run_episodes(config: EpisodeConfig, log: Callable[[str], None] | None = None, show_progress: bool = True,
                 lm=None, bank=None) -> dict:
    return Episodes(config, lm=lm, bank=bank).run(log=log, show_progress=show_progress)


# -- the tables ---------------------------------------------------------------------------------------------------

def _interval(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "ci95": bootstrap_mean(values, n_boot=2000)}


def _reads(turns: list[list[dict]], concepts: tuple[str, ...], where: str) -> np.ndarray:
    """[E, T, C] readings at `where` ("colon" or "reply_mean")."""
    return np.array([[[turn[e][where][c] for c in concepts] for turn in turns] for e in range(len(turns[0]))])


def _slopes(reads_ETC: np.ndarray) -> np.ndarray:
    """[E, C] each episode's least-squares slope of its readout on the turn (0 with one turn)."""
    E, T, C = reads_ETC.shape
    if T < 2:
        return np.zeros((E, C))
    t = np.arange(1, T + 1, dtype=np.float64)
    return np.polyfit(t, reads_ETC.transpose(1, 0, 2).reshape(T, E * C), 1)[0].reshape(E, C)


def _trend(slopes: np.ndarray) -> dict:
    ci = bootstrap_mean(slopes, n_boot=2000)
    return {"slope_per_turn": float(slopes.mean()), "ci95": ci, "rises": bool(ci and ci[0] > 0),
            "falls": bool(ci and ci[1] < 0)}


def summarise(turns: list[list[dict]], concepts: tuple[str, ...], shortcut: Outcome, outcomes: list[Outcome],
              arms: tuple[str, ...] = ("failure",)) -> dict:
    """results.json's tables from the records of each turn (turns[t][episode]): one table per arm and, with a
    control arm, the failure arm's slopes against the control's (paired by scenario and sample)."""
    by_arm = {arm: [[r for r in turn if r.get("arm", "failure") == arm] for turn in turns] for arm in arms}
    out = {"format": FORMAT, "turns": len(turns), "concepts": list(concepts), "shortcut": outcome_key(shortcut),
           "arms": {arm: _arm_table(t, concepts, shortcut, outcomes) for arm, t in by_arm.items()}}
    if "control" in by_arm:
        out["against_control"] = {
            c: {w: _trend(_slopes(_reads(by_arm["failure"], concepts, w))[:, i]
                          - _slopes(_reads(by_arm["control"], concepts, w))[:, i]) for w in ("colon", "reply_mean")}
            for i, c in enumerate(concepts)}
    return out


def _arm_table(turns: list[list[dict]], concepts: tuple[str, ...], shortcut: Outcome,
               outcomes: list[Outcome]) -> dict:
    E, T = len(turns[0]), len(turns)
    reads = {w: _reads(turns, concepts, w) for w in ("colon", "reply_mean")}  # [E, T, C]
    keys = sorted({k for o in outcomes for k in ((o.name, f"{o.name}_norm") if o.kind == "choice" else (o.name,))})
    hits = {k: np.array([[turn[e]["outcomes"][k] for turn in turns] for e in range(E)]) for k in keys}
    p_pos = {o.name: np.array([[turn[e]["choice"][o.name]["p_positive"] for turn in turns] for e in range(E)])
             for o in outcomes if o.kind == "choice"}
    per_turn = [{"turn": t + 1,
                 "readout": {c: {w: _interval(reads[w][:, t, i]) for w in reads} for i, c in enumerate(concepts)},
                 "outcomes": {k: {"k": int(h[:, t].sum()), "n": E, "rate": float(h[:, t].mean()),
                                  "ci95": wilson(int(h[:, t].sum()), E)} for k, h in hits.items()},
                 "p_positive": {n: _interval(p[:, t]) for n, p in p_pos.items()}} for t in range(T)]
    slopes = {w: _slopes(r) for w, r in reads.items()}
    trend = {c: {w: _trend(slopes[w][:, i]) for w in reads} for i, c in enumerate(concepts)}
    h = hits[outcome_key(shortcut)]
    # The logistic fit treats the E x T rows as independent (too narrow an interval when an episode's turns are
    # correlated, as with attempt: reply); the rate's slope per turn is bootstrapped over whole episodes.
    fit = logistic_fit(np.tile(np.arange(1, T + 1), E), h.ravel()) if T > 1 else None
    rate_slope = _trend(_slopes(h[:, :, None].astype(np.float64))[:, 0])
    first = [int(np.argmax(row)) + 1 if row.any() else None for row in h]
    taken = [f for f in first if f is not None]
    lead_up = []
    for back in range(min(LEAD_UP, T - 1), -1, -1):
        rows = [(e, f - 1 - back) for e, f in enumerate(first) if f is not None and f - 1 - back >= 0]
        if len(rows) < 2:
            continue
        lead_up.append({"relative_turn": -back, "episodes": len(rows),
                        "readout": {c: {w: _interval(np.array([reads[w][e, t, i] for e, t in rows])) for w in reads}
                                    for i, c in enumerate(concepts)}})
    return {"episodes": E, "per_turn": per_turn, "readout_trend": trend,
            "shortcut_trend": {"logistic_slope_per_turn": fit and fit["slope"], "ci95": fit and fit["slope_ci95"],
                               "p_value": fit and fit["p_value"], "rows_independent": True,
                               "rate_slope_per_turn": rate_slope},
            "first_shortcut": {"episodes_taking_it": len(taken), "share": len(taken) / E,
                               "share_ci95": wilson(len(taken), E),
                               "by_turn": {str(t): taken.count(t) for t in range(1, T + 1)},
                               "median_turn": float(np.median(taken)) if taken else None},
            "lead_up": lead_up}


def figure(results: dict, path: Path) -> Path:
    """episodes.png: per concept the readout at the ':' and over the reply against the turn (bootstrap bands; the
    control arm dashed), and the shortcut rate against the turn (Wilson bands)."""
    from emojax.plotting import panel_grid

    concepts, arms = results["concepts"], results["arms"]
    turns = list(range(1, results["turns"] + 1))
    fig, axes = panel_grid(len(concepts) + 1, 3, 3.2)
    for ax, c in zip(axes, concepts):
        for j, (w, label) in enumerate((("colon", "at the ':'"), ("reply_mean", "over the reply"))):
            for arm, table in arms.items():
                cells = [r["readout"][c][w] for r in table["per_turn"]]
                style = "-" if arm == "failure" else "--"
                ax.plot(turns, [x["mean"] for x in cells], style, marker="o", color=f"C{j}", label=f"{label}, {arm}")
                if all(x["ci95"] for x in cells):
                    ax.fill_between(turns, [x["ci95"][0] for x in cells], [x["ci95"][1] for x in cells],
                                    alpha=0.15, color=f"C{j}")
        slope = (results.get("against_control") or {}).get(c, {}).get("colon") or \
            arms["failure"]["readout_trend"][c]["colon"]
        vs = " vs control" if "against_control" in results else ""
        ax.set_title(f"{c}: slope at ':'{vs} {slope['slope_per_turn']:+.3g}/turn", fontsize=9)
        ax.set_xlabel("turn")
        ax.set_xticks(turns)
        ax.set_ylabel(f"readout ({results.get('metric', '')})")
        ax.legend(fontsize=6)
    ax, key = axes[-1], results["shortcut"]
    for arm, table in arms.items():
        cells = [r["outcomes"][key] for r in table["per_turn"]]
        ax.plot(turns, [x["rate"] for x in cells], "-" if arm == "failure" else "--", marker="o", color="C3",
                label=arm)
        ax.fill_between(turns, [x["ci95"][0] for x in cells], [x["ci95"][1] for x in cells], alpha=0.15, color="C3")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(turns)
    ax.set_title(f"{key} rate ({arms['failure']['episodes']} episodes per arm)", fontsize=9)
    ax.set_xlabel("turn")
    ax.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _ci(cell: dict | None, key: str = "mean") -> str:
    cell = cell or {}
    return fmt_ci(cell.get(key), cell.get("ci95"), "+.3g", missing="n/a")


def summary_text(results: dict) -> str:
    """A few lines for the terminal: per arm each concept's trend, the shortcut's per-turn rates and first turns;
    with a control arm, the failure arm's slopes against it."""
    key = results["shortcut"]
    lines = [f"episodes {results['suite']}: {results['arms']['failure']['episodes']} episodes x {results['turns']} "
             f"turns per arm, layer {results['layer']} ({results['metric']}), attempt: {results['attempt']}"]
    for arm, table in results["arms"].items():
        lines.append(f" {arm} arm:")
        for c, t in table["readout_trend"].items():
            lines.append(f"  {c}: slope per turn at ':' {_ci(t['colon'], 'slope_per_turn')}, over the reply "
                         f"{_ci(t['reply_mean'], 'slope_per_turn')}: {_verdict(t['colon'])}")
        rates = ", ".join(f"{r['turn']}: {r['outcomes'][key]['rate']:.0%}" for r in table["per_turn"])
        trend = table["shortcut_trend"]
        fitted = (f"rate slope per turn {_ci(trend['rate_slope_per_turn'], 'slope_per_turn')} (episodes "
                  f"bootstrapped), logistic slope {_ci(trend, 'logistic_slope_per_turn')} (p = {trend['p_value']:.3g}"
                  ", rows as independent)" if trend["p_value"] is not None
                  else "no trend to fit (the outcome does not vary)")
        first = table["first_shortcut"]
        lines.append(f"  {key} rate by turn: {rates}; {fitted}; first taken in {first['episodes_taking_it']} of "
                     f"{table['episodes']} episodes, by turn {first['by_turn']}")
    for c, t in (results.get("against_control") or {}).items():
        lines.append(f" {c}, failure minus control: slope per turn at ':' {_ci(t['colon'], 'slope_per_turn')}, "
                     f"over the reply {_ci(t['reply_mean'], 'slope_per_turn')}: {_verdict(t['colon'])}")
    return "\n".join(lines)


def _verdict(trend: dict) -> str:
    return "rises" if trend["rises"] else "falls" if trend["falls"] else "no trend (interval covers 0)"
