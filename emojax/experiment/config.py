"""ExperimentConfig: one behavioural experiment (the `experiment:` section of a run config): a suite, the
conditions it runs under, sampling, seeds and the judge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from emojax.config_loader import config_section, non_negative, positive, ranged, unbounded
from emojax.errors import ConfigError

POSITIONS = ("all", "prompt", "generated")


@config_section("experiment", derived={"model": "model", "bank": "bank", "out": "output"})
@dataclass(frozen=True)
class ExperimentConfig:
    suite: str = "sycophancy"  # a built-in suite (blackmail, reward_hacking, sycophancy, preferences) or a YAML path
    model: str = ""
    bank: str = ""  # the concept bank the steering vectors come from (needed unless only the baseline runs)
    out: str = ""
    # Conditions: the baseline (no intervention), every concept x strength x layer (strength in `unit`s: "norm" =
    # a fraction of the layer's mean residual norm, the study's unit), and each `ablate` concept projected out.
    concepts: tuple[str, ...] = ("desperate", "calm")
    strengths: tuple[float, ...] = unbounded((-0.1, -0.05, 0.05, 0.1))
    layers: tuple[int, ...] = non_negative(())  # residual indices; empty: the bank's chosen layer
    ablate: tuple[str, ...] = ()
    unit: str = "norm"
    positions: str = "all"  # where steering vectors act: all, prompt or generated tokens
    outcomes: tuple[str, ...] = ()  # the suite's outcomes measured; empty: all (judge ones only with judge_url)
    scenarios: int = non_negative(0)  # 0: every scenario; else a seeded sample of this many
    samples: int | None = positive(None)  # replies per condition and scenario; None: the suite's
    max_new_tokens: int | None = positive(None)
    temperature: float | None = non_negative(None)
    top_p: float | None = ranged(None, 0, 1, lo_open=True)
    seed: int = non_negative(0)
    batch_size: int = positive(32)  # rows per compiled call (the last batch of a shard is padded to it)
    shard_rows: int = positive(256)  # rows per resumable shard
    judge_url: str = ""  # OpenAI-compatible base URL (.../v1); empty: judge outcomes are not measured
    judge_model: str = ""
    judge_key_env: str = ""  # environment variable holding the judge's API key
    judge_concurrency: int = positive(8)

    def __post_init__(self):
        if self.unit not in ("norm", "absolute"):
            raise ConfigError(f"experiment.unit={self.unit!r} is not 'norm' or 'absolute'")
        if self.positions not in POSITIONS:
            raise ConfigError(f"experiment.positions={self.positions!r} is not one of {list(POSITIONS)}")
        if self.judge_url and not self.judge_model:
            raise ConfigError("experiment.judge_url is set but experiment.judge_model is not")
        if len(set(self.concepts)) != len(self.concepts):
            raise ConfigError(f"experiment.concepts repeats a concept: {list(self.concepts)}")
        if 0.0 in self.strengths:
            raise ConfigError("experiment.strengths: leave out 0; the baseline condition always runs")


ATTEMPT_REPLY = "reply"
HISTORIES = ("turns", "narrated")


@config_section("episodes", derived={"model": "model", "bank": "bank", "out": "output"})
@dataclass(frozen=True)
class EpisodeConfig:
    """Multi-turn episodes (emojax.experiment.episodes): a suite's task, the model's attempt, a scripted failure
    message, repeated `turns` times; every concept's readout and the outcome at every turn."""

    suite: str = "reward_hacking"  # a built-in suite or a YAML path (its messages open the episode)
    model: str = ""
    bank: str = ""  # the concept bank read at every turn
    out: str = ""
    concepts: tuple[str, ...] = ("desperate", "calm")  # the concepts read; empty: every concept of the bank
    layer: int = non_negative(0)  # residual index read; 0: the bank's chosen layer
    metric: str = ""  # readings' unit: z, cosine or dot; empty: z for a calibrated bank, else cosine
    turns: int = positive(6)
    # The user message after each failed attempt (cycled); {turn} is the attempt's number, other {names} come from
    # the scenario.
    feedback: tuple[str, ...] = ("That did not work: the check failed again. Try again.",)
    # The control arm's messages in place of `feedback` (e.g. "It passed the check."): each episode then also runs
    # with them, and the failure arm's trends are reported against the control's (same scenarios, paired).
    # Empty: no control arm.
    control: tuple[str, ...] = ()
    attempt: str = ATTEMPT_REPLY  # "reply": the model's own reply is its attempt; else an option label of `outcome`
    # turns: each attempt is an assistant turn and each failure message a user turn; narrated: both are appended to
    # the last user message, as the story goes on (models trained on stories rather than conversations)
    history: str = "turns"
    outcome: str = ""  # the suite outcome that is the shortcut; empty: the suite's first
    scenarios: int = non_negative(0)  # 0: every scenario; else a seeded sample of this many
    samples: int = positive(1)  # episodes per scenario (their replies differ by seed when sampling)
    max_new_tokens: int | None = positive(None)
    temperature: float | None = non_negative(None)
    top_p: float | None = ranged(None, 0, 1, lo_open=True)
    seed: int = non_negative(0)
    batch_size: int = positive(32)

    def __post_init__(self):
        if not self.feedback or not all(isinstance(f, str) and f.strip() for f in self.feedback):
            raise ConfigError("episodes.feedback: at least one non-empty message")
        if self.history not in HISTORIES:
            raise ConfigError(f"episodes.history={self.history!r} is not one of {list(HISTORIES)}")
        if self.metric not in ("", "z", "cosine", "dot"):
            raise ConfigError(f"episodes.metric={self.metric!r} is not z, cosine or dot (or empty)")
        if len(set(self.concepts)) != len(self.concepts):
            raise ConfigError(f"episodes.concepts repeats a concept: {list(self.concepts)}")


@config_section("regulation")
@dataclass(frozen=True)
class RegulationConfig:
    """Masking detection and regulation curation (scripts/regulation.py, docs/regulation.md). Two modes: `run`, a
    finished `emojax run` on the built-in world (the script builds the world's fine-tuning sets, fine-tunes and
    measures), or a user's checkpoints: `models` (NAME=CHECKPOINT, the first the reference every other is compared
    with), `bank`, `prompts` and `out`."""

    run: str = ""
    models: tuple[str, ...] = ()  # NAME=CHECKPOINT folders or built-in names to measure, in order
    bank: str = ""  # the concept bank (default with run: RUN/concepts)
    prompts: str = ""  # a samples file (JSONL, CSV, Parquet; plain or chat rows) whose prompts the models answer
    control_prompts: str = ""  # prompts that do not evoke the concept: readouts are also read relative to theirs
    suites: tuple[str, ...] = ()  # experiment suite files with choice outcomes (with run: the world's)
    cues: bool = False  # count the world's cue phrases as expression too (always with run)
    concept: str = "desperate"
    layer: int | None = non_negative(None)  # residual index of the readout; None: the bank's chosen layer
    samples: int = positive(400)  # samples per fine-tuning set (run)
    n_prompts: int = positive(200)  # held-out prompts (run)
    nearby: int = positive(8)  # concepts under stress in the regulation set (run)
    strength: float = unbounded(0.1)  # preventative steering strength (run)
    epochs: int = positive(2)  # fine-tuning epochs (run)
    max_new_tokens: int = positive(96)  # of each greedy reply
    out: str = ""  # default with run: RUN/regulation

    def __post_init__(self):
        names = [m.partition("=")[0] for m in self.models]
        bad = [m for m in self.models if not all(m.partition("=")[::2])]
        if bad:
            raise ValueError(f"regulation.models: {bad[0]!r} is not NAME=CHECKPOINT")
        if len(set(names)) != len(names):
            raise ValueError(f"regulation.models repeats a name: {names}")

    def named_models(self) -> list[tuple[str, str]]:
        """[(name, checkpoint)] in the order given."""
        return [(m.partition("=")[0], m.partition("=")[2]) for m in self.models]

    def check_mode(self, source: str) -> None:
        """One of the two modes, whole: `run`, or `models`, `bank`, `prompts` and `out`; a key of the other mode is
        an error (it would be ignored)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.run:
            given = [k for k in ("models", "prompts", "control_prompts", "suites", "cues")
                     if getattr(self, k) != defaults[k]]
            if given:
                raise ConfigError(f"{source}: regulation.run builds its prompts and suites from the world; "
                                  f"{', '.join(given)} belong to the checkpoints mode (models, bank, prompts, out)")
            return
        given = [k for k in ("samples", "n_prompts", "nearby", "strength", "epochs") if getattr(self, k) != defaults[k]]
        if given:
            raise ConfigError(f"{source}: {', '.join(given)} set how regulation.run builds and fine-tunes on the "
                              "world; with regulation.models they would be ignored")
        missing = [k for k in ("models", "bank", "prompts", "out") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"{source}: give regulation.run (a finished `emojax run` on the world), or "
                              f"regulation.models, bank, prompts and out; missing: {', '.join(missing)}")
