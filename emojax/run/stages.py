"""The stages of `emojax run`, each a thin adapter from the run file to one stage's library function.

A stage says which settings it runs with (its fingerprint, with its dependencies' fingerprints; the table of
which settings count is fingerprints.py), which outputs it owns (moved aside when its inputs change) and how
to tell they are complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from emojax.config_loader import SECTIONS
from emojax.corpus.world_config import WorldConfig, split_mismatch
from emojax.digest import digest
from emojax.errors import ConfigError
from emojax.fileio import write_json, write_text
from emojax.run.config import RunFile
from emojax.progress import log
from emojax.run.fingerprints import output_settings


@dataclass
class Context:
    run_file: RunFile
    run_dir: Path
    show_progress: bool = True
    results: dict = field(default_factory=dict)  # stage -> summary
    fingerprints: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def model(self) -> str:
        """The checkpoint every stage reads: run.model, or for a built-in preset the folder the train stage
        produced (a given checkpoint is never taken from a record, so a moved checkpoint is read where it is)."""
        from emojax.models.presets import BUILTIN_NAMES

        if self.run_file.run.model in BUILTIN_NAMES and self.results.get("train", {}).get("path"):
            return self.results["train"]["path"]
        return self.run_file.run.model


class Stage:
    name = ""
    depends: tuple[str, ...] = ()

    def settings(self, ctx: Context) -> dict:
        raise NotImplementedError

    def run(self, ctx: Context) -> dict:
        raise NotImplementedError

    def outputs(self, ctx: Context) -> list[Path]:
        return [ctx.path(self.name)]

    def outputs_exist(self, ctx: Context) -> bool:
        return all(p.exists() for p in self.outputs(ctx))

    def wants_check(self, ctx: Context) -> bool:
        """True when a complete stage should still check its outputs (dump.verify=true)."""
        return False

    def check(self, ctx: Context) -> str:
        raise NotImplementedError


class Train(Stage):
    """Trains the built-in model on first use (cached across runs); a no-op for a given checkpoint."""

    name = "train"

    def _config(self, ctx: Context):
        from emojax.models.presets import BUILTIN_NAMES

        model = ctx.run_file.run.model
        if model not in BUILTIN_NAMES:
            return None
        # run.model names the preset the train section starts from (builtin:tiny: tiny)
        return SECTIONS["train"].build({"preset": BUILTIN_NAMES[model], **ctx.run_file.section("train")},
                                       ctx.run_file.source)

    def settings(self, ctx):
        from emojax.models.identity import model_identity

        config = self._config(ctx)
        if config is None:  # a given checkpoint, known by its content (a moved copy is the same model)
            return {"model": model_identity(ctx.run_file.run.model)["id"]}
        return {"train": config.fingerprint()}

    def run(self, ctx):
        from emojax.models.presets import BUILTIN_NAMES
        from emojax.train import ensure_builtin_model, read_train_json

        config = self._config(ctx)
        if config is None:
            return {"path": ctx.run_file.run.model, "trained": False}
        path = ensure_builtin_model(config=config, name=BUILTIN_NAMES[ctx.run_file.run.model],
                                    progress=ctx.show_progress)
        info = read_train_json(path) or {}
        return {"path": str(path), "trained": True,
                **{k: v for k, v in info.items() if k not in ("history", "config", "fingerprint")}}

    def outputs(self, ctx):
        return []  # the built-in model lives in the shared cache, never removed by a run

    def outputs_exist(self, ctx):
        path = ctx.model
        return path.startswith("random:") or Path(path).is_dir()


class Corpus(Stage):
    name = "corpus"
    depends = ("train",)

    def _config(self, ctx: Context):
        model = Path(ctx.model)
        tokenizer = str(model) if (model / "tokenizer.json").is_file() else "byte"
        config = ctx.run_file.config("corpus", {"out": str(ctx.path("corpus")), "tokenizer": tokenizer})
        check_world_split(ctx.run_file, config)
        return config

    def settings(self, ctx):
        from emojax.corpus.build import input_versions

        config = self._config(ctx)
        settings = output_settings("corpus", config)
        # The tokenizer is the model's (covered by the train stage's content fingerprint), not its path.
        settings["tokenizer"] = "byte" if settings["tokenizer"] == "byte" else "model"
        settings["input_versions"] = input_versions(config)  # an edited input file is a changed input
        return settings

    def run(self, ctx):
        from emojax.pipelines.corpus import build_corpus

        manifest = build_corpus(self._config(ctx))
        return {k: manifest[k] for k in ("documents_in", "documents_written", "rejected", "deduplicated",
                                         "tokens_written", "per_split")}

    def outputs_exist(self, ctx):
        return ctx.path("corpus", "manifest.json").is_file()


class Dump(Stage):
    name = "dump"
    depends = ("train", "corpus")

    def _config(self, ctx: Context):
        return ctx.run_file.config("dump", {"corpus": str(ctx.path("corpus")), "out": str(ctx.path("activations")),
                                            "model": ctx.model, "attention": ctx.run_file.run.attention})

    def settings(self, ctx):
        return output_settings("dump", self._config(ctx))

    def run(self, ctx):
        from emojax.store import dump

        config = self._config(ctx)
        state = dump(config, show_progress=ctx.show_progress, log=log)
        summary = json.loads(ctx.path("activations", "summary", "process-000.json").read_text())
        return {"layers": state["layers"], "n_docs": state["n_docs"], "n_tokens": state["n_tokens"],
                "short_docs": state.get("short_docs"), **summary}

    def outputs(self, ctx):
        return [ctx.path("activations")]

    def wants_check(self, ctx):
        return self._config(ctx).verify

    def check(self, ctx):
        """dump.verify=true on a complete store: reread every shard, rewrite only corrupted ones (same bits)."""
        from emojax.store import dump

        state = dump(self._config(ctx), show_progress=ctx.show_progress, log=log)
        return f"verified {len(state.get('complete_shards', []))} shard(s)"

    def outputs_exist(self, ctx):
        store = ctx.path("activations", "store.json")
        return store.is_file() and json.loads(store.read_text()).get("complete", False)


class Fit(Stage):
    name = "fit"
    depends = ("dump",)

    def _config(self, ctx: Context):
        return ctx.run_file.config("fit", {"store": str(ctx.path("activations")), "out": str(ctx.path("concepts")),
                                           "model": ctx.model})

    def settings(self, ctx):
        return output_settings("fit", self._config(ctx))

    def run(self, ctx):
        from emojax.concepts import fit

        bank = fit(self._config(ctx), log=log)
        report = json.loads(ctx.path("concepts", "eval.json").read_text())
        return {"concepts": len(bank.names), "layers": list(bank.layers), "best_layer": report.get("best_layer")}

    def outputs(self, ctx):
        return [ctx.path("concepts")]

    def outputs_exist(self, ctx):
        return all(ctx.path("concepts", f).is_file() for f in ("bank.json", "bank.safetensors", "eval.json"))


class Validate(Stage):
    """The study's remaining validations of the fitted bank (emojax.concepts.validate): top-activating tokens on
    held-out text and numeric templates, at the run's layer. Writes validate/top_tokens.json and
    validate/templates.json; the report shows them."""

    name = "validate"
    depends = ("train", "dump", "fit")

    def _config(self, ctx: Context):
        return ctx.run_file.config("validate")

    def settings(self, ctx):
        from emojax.concepts.templates import builtin_templates_file

        config = self._config(ctx)
        templates = Path(config.templates) if config.templates else builtin_templates_file()
        # the templates by content: an edited file recomputes the stage, a moved copy does not
        text = templates.read_text(encoding="utf-8") if templates.is_file() else None
        return {**output_settings("validate", config), "templates_sha256": digest(text),
                "layer": ctx.run_file.run.layer, "attention": ctx.run_file.run.attention}

    def run(self, ctx):
        from emojax.concepts import load_bank
        from emojax.concepts.layer import bank_layer
        from emojax.concepts.validate import validate
        from emojax.models import load_model
        from emojax.store import ActivationStore

        bank = load_bank(ctx.path("concepts"))
        lm = load_model(ctx.model, attention=ctx.run_file.run.attention)
        layer = bank_layer(bank, lm.config.n_layers, ctx.run_file.run.layer or None)
        return validate(self._config(ctx), ActivationStore(str(ctx.path("activations"))), bank, lm, layer,
                        ctx.path("validate"), log=log, show_progress=ctx.show_progress)

    def outputs_exist(self, ctx):
        return all(ctx.path("validate", f).is_file() for f in ("top_tokens.json", "templates.json"))


class Baseline(Stage):
    """The same dump and fit on a random-init model of the run's model's shape (seed 0, the model's tokenizer):
    what the concept vectors' accuracies are read against (METHOD.md section 8). Writes baseline/model (the
    random weights), baseline/activations and baseline/concepts; the report quotes its figures."""

    name = "baseline"
    depends = ("train", "corpus", "fit")
    SEED = 0

    def _configs(self, ctx: Context):
        model, store = str(ctx.path("baseline", "model")), str(ctx.path("baseline", "activations"))
        dump = ctx.run_file.config("dump", {"corpus": str(ctx.path("corpus")), "out": store, "model": model,
                                            "attention": ctx.run_file.run.attention})
        fit = ctx.run_file.config("fit", {"store": store, "out": str(ctx.path("baseline", "concepts")), "model": ""})
        return dump, fit

    def settings(self, ctx):
        dump, fit = self._configs(ctx)
        return {"dump": output_settings("dump", dump), "fit": output_settings("fit", fit), "init_seed": self.SEED}

    def run(self, ctx):
        from emojax.concepts import fit
        from emojax.models import load_model, random_model
        from emojax.store import dump

        dump_config, fit_config = self._configs(ctx)
        lm = load_model(ctx.model, dtype=dump_config.model_dtype)
        weights = random_model(lm.config, dtype=dump_config.model_dtype, seed=self.SEED, tokenizer=lm.tokenizer)
        weights.hf_config = lm.hf_config
        weights.save(dump_config.model)
        dump(dump_config, show_progress=ctx.show_progress, log=log)
        fit(fit_config, log=log)
        report = json.loads(ctx.path("baseline", "concepts", "eval.json").read_text())
        best = report.get("best_layer")
        figures = report["per_layer"].get(str(best), {})
        return {"best_layer": best, **{f"{split}_top1": figures.get(split, {}).get("nearest", {}).get("top1")
                                       for split in ("test", "implicit")}}

    def outputs(self, ctx):
        return [ctx.path("baseline")]

    def outputs_exist(self, ctx):
        return ctx.path("baseline", "concepts", "eval.json").is_file()


class SaeStage(Stage):
    """Trains the configured SAE(s) on the store, exports and evaluates them (emojax.sae.evaluate)."""

    name = "sae"
    depends = ("dump", "fit")

    def _config(self, ctx: Context):
        return ctx.run_file.config("sae", {"store": str(ctx.path("activations")), "out": str(ctx.path("sae", "main")),
                                           "model": ctx.model, "bank": str(ctx.path("concepts"))})

    def settings(self, ctx):
        return output_settings("sae", self._config(ctx))

    def run(self, ctx):
        from emojax.sae.evaluate import train_and_evaluate

        summary, metrics = train_and_evaluate(self._config(ctx), log=log if ctx.show_progress else None)
        return {"saes": len(metrics), "tokens": summary["tokens"], "seconds": round(summary["seconds"], 2),
                "tokens_per_s": summary["tokens"] / max(summary["seconds"], 1e-9),
                **{k: metrics[0][k] for k in ("l0", "fvu", "dead_fraction", "ce_loss_recovered")}}

    def outputs(self, ctx):
        return [ctx.path("sae")]

    def outputs_exist(self, ctx):
        return ctx.path("sae", "main", "metrics.json").is_file()


class Steer(Stage):
    """Steering curves (evaluate_steering) and one monitored generation, for the report."""

    name = "steer"
    depends = ("fit",)

    def _config(self, ctx: Context):
        return ctx.run_file.config("steer")

    def settings(self, ctx):
        return {**output_settings("steer", self._config(ctx)), "layer": ctx.run_file.run.layer,
                "attention": ctx.run_file.run.attention}

    def run(self, ctx):
        from emojax.concepts import load_bank
        from emojax.concepts.layer import bank_layer
        from emojax.models import load_model
        from emojax.steer import Decoder
        from emojax.steer.evaluate import SteeringEval, evaluate_steering, steering_curves
        from emojax.steer.generate import monitored_generation

        config = self._config(ctx)
        bank = load_bank(ctx.path("concepts"))
        lm = load_model(ctx.model, attention=ctx.run_file.run.attention)
        layer = bank_layer(bank, lm.config.n_layers, ctx.run_file.run.layer or None)
        decoder = Decoder(lm)
        # First: like `emojax monitor`, it refuses a bank of another model before any other work.
        monitor = monitored_generation(lm, bank, config.monitor_prompt, layer, config.monitor_new_tokens, decoder,
                                       warn=log)
        concepts = [c for c in config.concepts if c in bank.names] or list(bank.names[:4])
        rows = evaluate_steering(lm, bank, concepts, list(config.prompts),
                                 SteeringEval(strengths=config.strengths, layer=layer,
                                              max_new_tokens=config.max_new_tokens), decoder=decoder)
        out = ctx.path("steer")
        write_text(out / "evaluation.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        write_json(out / "curves.json", steering_curves(rows, layer))
        write_json(out / "monitor.json", monitor, indent=None)
        write_text(out / "generations.jsonl", json.dumps({"prompt": config.monitor_prompt, **monitor}) + "\n")
        strongest = max(rows, key=lambda r: abs(r["logprob_shift"])) if rows else {}
        return {"layer": layer, "concepts": concepts, "rows": len(rows),
                "largest_logprob_shift": strongest.get("logprob_shift")}

    def outputs_exist(self, ctx):
        return all(ctx.path("steer", f).is_file() for f in ("curves.json", "monitor.json"))


class ExperimentStage(Stage):
    """A behavioural experiment (emojax.experiment): the experiment: section's suite under the baseline and the
    steering conditions, with the run's model and fitted concepts; writes experiment/ (resumable by shard)."""

    name = "experiment"
    depends = ("train", "fit")

    def _config(self, ctx: Context):
        from emojax.world.suites import SUITE_NAMES

        config = ctx.run_file.config("experiment", {"model": ctx.model, "bank": str(ctx.path("concepts")),
                                                    "out": str(ctx.path("experiment"))})
        if config.suite in SUITE_NAMES.values() and not Path(config.suite).is_file():
            # a world suite by name: the one the corpus stage wrote from the run's own world
            if not ctx.run_file.config("corpus").world:
                raise ConfigError(f"{ctx.run_file.source}: experiment.suite={config.suite} is a world suite, written "
                                  "by the corpus stage when corpus.generator.kind=world; set that, or name another "
                                  "suite")
            config = replace(config, suite=str(ctx.path("corpus", "suites", f"{config.suite}.yaml")))
        return config

    def settings(self, ctx):
        from emojax.experiment.suite import suite_path

        config = self._config(ctx)
        # the suite by content: an edited suite reruns the stage, a moved copy does not
        return {**output_settings("experiment", config), "suite": digest(suite_path(config.suite).read_text()),
                "layer": ctx.run_file.run.layer, "attention": ctx.run_file.run.attention}

    def run(self, ctx):
        import dataclasses

        from emojax.experiment import run_experiment
        from emojax.models import load_model

        config = self._config(ctx)
        if ctx.run_file.run.layer and not config.layers:
            config = dataclasses.replace(config, layers=(ctx.run_file.run.layer,))
        lm = load_model(ctx.model, attention=ctx.run_file.run.attention)
        results = run_experiment(config, log=log, show_progress=ctx.show_progress, lm=lm)
        return {"suite": results["suite"], "conditions": len(results["conditions"]),
                "scenarios": results["scenarios"], "outcomes": list(results["rates"])}

    def outputs_exist(self, ctx):
        return all(ctx.path("experiment", f).is_file() for f in ("results.json", "transcripts.jsonl"))


class Report(Stage):
    name = "report"
    depends = ("corpus", "dump", "fit", "validate", "sae", "steer", "experiment")

    def settings(self, ctx):
        return {}

    def run(self, ctx):
        from emojax.report import build_report

        return {"path": str(build_report(ctx.run_dir))}

    def outputs_exist(self, ctx):
        return ctx.path("report", "index.html").is_file()


STAGES: dict[str, Stage] = {s.name: s for s in (Train(), Corpus(), Dump(), Fit(), Validate(), Baseline(), SaeStage(),
                                                  Steer(), ExperimentStage(), Report())}


def _model_world(run_file: RunFile) -> tuple[str, WorldConfig] | None:
    """(where it is set, the world) a world-trained model read: the train: section of a built-in model, or the
    train.json of a run.model folder trained on the world (scripts/world_scale.sh, emojax train-lm); else None."""
    from emojax.train.builtin import TRAIN_JSON, read_train_json

    model = run_file.run.model
    if Path(model).is_dir():
        config = (read_train_json(model) or {}).get("config") or {}
        if config.get("data") != "world" or not isinstance(config.get("world"), dict):
            return None
        try:
            return f"{Path(model) / TRAIN_JSON}'s world", WorldConfig.from_json(config["world"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{Path(model) / TRAIN_JSON}: config.world does not read as world settings ({e})") \
                from None
    train = Train()._config(Context(run_file=run_file, run_dir=Path(".")))
    if train is None or train.data != "world":
        return None
    return "train.world", train.world


def check_world_split(run_file: RunFile, corpus) -> None:
    """A model trained on the world (built in, or a run.model folder) and a world corpus must hold out the same
    situations: otherwise the corpus's val, test and implicit situations are in the model's training text. They
    must also write situations in the same style (world.situation_style) and draw the same emotions
    (world.concepts)."""
    trained = _model_world(run_file) if corpus.world else None
    if trained is None:
        return
    where, world = trained
    differ = split_mismatch(world, corpus.generator.world)
    if differ:
        raise ConfigError(f"{run_file.source}: {where} and corpus.generator.world hold out different situations "
                          f"({'; '.join(differ)}), so the corpus's held-out situations would be in the model's "
                          "training text; give both the same split_seed, temperature and fractions")
    styles = world.situation_style, corpus.generator.world.situation_style
    if styles[0] != styles[1]:
        raise ConfigError(f"{run_file.source}: {where} has situation_style {styles[0]!r} and "
                          f"corpus.generator.world {styles[1]!r}: the corpus would write situations in a form the "
                          "model never read; give both the same")
    emotions = world.concept_names(), corpus.generator.world.concept_names()
    if emotions[0] != emotions[1]:
        raise ConfigError(f"{run_file.source}: {where} draws {len(emotions[0])} emotions and "
                          f"corpus.generator.world {len(emotions[1])}, or other ones (world.concepts): the corpus's "
                          "implicit scenarios are labelled by the world's own emotions; give both the same")


def check_run_file(run_file: RunFile) -> None:
    """Types every section before anything runs, so a bad key fails in a second, not after the corpus stage."""
    from emojax.errors import CheckpointError
    from emojax.models.presets import BUILTIN_NAMES, RANDOM_PREFIX

    for name in SECTIONS:
        if name not in ("run", "train"):  # run is typed on reading; train only for a built-in model, below
            run_file.config(name)
    if "train" in run_file.sections:
        Train()._config(Context(run_file=run_file, run_dir=Path(".")))
    check_world_split(run_file, run_file.config("corpus"))
    model = run_file.run.model
    if model not in BUILTIN_NAMES and not model.startswith(RANDOM_PREFIX) and not Path(model).is_dir():
        raise CheckpointError(f"run.model={model!r}: no such checkpoint folder (or use builtin, builtin:tiny or "
                              "random:SHAPE)")
