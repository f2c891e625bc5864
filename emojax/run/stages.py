"""The stages of `emojax run`, each a thin adapter from the run file to one stage's library function.

A stage says which settings it runs with (its fingerprint, with its dependencies' fingerprints; the table of
which settings count is fingerprints.py), which outputs it owns (moved aside when its inputs change) and how
to tell they are complete.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from emojax.config_loader import positive, unbounded
from emojax.fileio import write_json, write_text
from emojax.locks import WriterLock
from emojax.run.config import RunFile, typed_section
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
        from emojax.train.config import train_config_from_section

        model = ctx.run_file.run.model
        if model not in BUILTIN_NAMES:
            return None
        return train_config_from_section(ctx.run_file.section("train"), ctx.run_file.source,
                                         default_preset=BUILTIN_NAMES[model])

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
        from emojax.corpus.config import CorpusConfig

        model = Path(ctx.model)
        tokenizer = str(model) if (model / "tokenizer.json").is_file() else "byte"
        return typed_section(CorpusConfig, ctx.run_file, "corpus",
                             {"out": str(ctx.path("corpus")), "tokenizer": tokenizer})

    def settings(self, ctx):
        from emojax.corpus.build import input_versions

        config = self._config(ctx)
        settings = output_settings("corpus", config)
        # The tokenizer is the model's (covered by the train stage's content fingerprint), not its path.
        settings["tokenizer"] = "byte" if settings["tokenizer"] == "byte" else "model"
        settings["input_versions"] = input_versions(config)  # an edited input file is a changed input
        return settings

    def run(self, ctx):
        from emojax.corpus.build import build_corpus

        manifest = build_corpus(self._config(ctx))
        return {k: manifest[k] for k in ("documents_in", "documents_written", "rejected", "deduplicated",
                                         "tokens_written", "per_split")}

    def outputs_exist(self, ctx):
        return ctx.path("corpus", "manifest.json").is_file()


class Dump(Stage):
    name = "dump"
    depends = ("train", "corpus")

    def _config(self, ctx: Context):
        from emojax.store import DumpConfig

        return typed_section(DumpConfig, ctx.run_file, "dump",
                             {"corpus": str(ctx.path("corpus")), "out": str(ctx.path("activations")),
                              "model": ctx.model})

    def settings(self, ctx):
        return output_settings("dump", self._config(ctx))

    def run(self, ctx):
        from emojax.store import dump

        config = self._config(ctx)
        state = dump(config, show_progress=ctx.show_progress, log=lambda m: print(m))
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

        state = dump(self._config(ctx), show_progress=ctx.show_progress, log=lambda m: print(m))
        return f"verified {len(state.get('complete_shards', []))} shard(s)"

    def outputs_exist(self, ctx):
        store = ctx.path("activations", "store.json")
        return store.is_file() and json.loads(store.read_text()).get("complete", False)


class Fit(Stage):
    name = "fit"
    depends = ("dump",)

    def _config(self, ctx: Context):
        from emojax.concepts import FitConfig

        return typed_section(FitConfig, ctx.run_file, "fit",
                             {"store": str(ctx.path("activations")), "out": str(ctx.path("concepts")),
                              "model": ctx.model})

    def settings(self, ctx):
        return output_settings("fit", self._config(ctx))

    def run(self, ctx):
        from emojax.concepts import fit

        bank = fit(self._config(ctx), log=print)
        report = json.loads(ctx.path("concepts", "eval.json").read_text())
        return {"concepts": len(bank.names), "layers": list(bank.layers), "best_layer": report.get("best_layer")}

    def outputs(self, ctx):
        return [ctx.path("concepts")]

    def outputs_exist(self, ctx):
        return all(ctx.path("concepts", f).is_file() for f in ("bank.json", "bank.safetensors", "eval.json"))


class SaeStage(Stage):
    """Trains the configured SAE(s) on the store, exports each, and writes metrics.json (held-out
    reconstruction, dead fraction, spliced-in LM loss, and the concept bank's best-matching latents)."""

    name = "sae"
    depends = ("dump", "fit")

    def _config(self, ctx: Context):
        from emojax.sae import SaeConfig

        return typed_section(SaeConfig, ctx.run_file, "sae",
                             {"store": str(ctx.path("activations")), "out": str(ctx.path("sae", "main"))})

    def settings(self, ctx):
        return output_settings("sae", self._config(ctx))

    def run(self, ctx):
        config = self._config(ctx)
        with WriterLock(config.out, what="SAE output"):  # held through training, export and metrics
            return self._train_and_export(ctx, config)

    def _train_and_export(self, ctx, config):
        import numpy as np

        from emojax.models import load_model
        from emojax.sae import (bank_max_cosine, dead_fraction, evaluate_batches, export_sae, heldout_tokens,
                                spliced_metrics, train_sae)
        from emojax.store import ActivationStore

        result = train_sae(config, log=print if ctx.show_progress else None)
        store = ActivationStore(config.store)
        test = store.select("test")
        held = [store.document_tokens(config.layer, int(i)).astype(np.float32) for i in test[:256]]
        tokens, mask = heldout_tokens(store, "test", max_docs=16)
        lm = load_model(ctx.model)
        bank = None
        if ctx.path("concepts", "bank.json").is_file():
            from emojax.concepts import load_bank

            bank = load_bank(ctx.path("concepts"))
            if config.layer not in bank.layers:
                bank = None
        entries = []
        for i in range(config.n_sae):
            sae = result.sae(i)
            value = config.values(config.sweep)[i] if config.sweep else None
            name = f"{config.variant}" + (f" {config.sweep}={value:g}" if config.sweep else f" k={config.k}")
            folder = export_sae(sae, ctx.path("sae", "main", f"sae_{i}"), hook_layer=config.layer,
                                extra={"sweep": config.sweep, "value": value,
                                       "model_identity": store.state.get("model_identity")})
            entry = {"name": name, "folder": str(folder), "layer": config.layer,
                     **evaluate_batches(sae, held),
                     "dead_fraction": dead_fraction(np.asarray(result.state["stats"]["since_fired"][i]),
                                                    config.dead_after_tokens),
                     **spliced_metrics(lm, sae, config.layer, tokens, mask)}
            if bank is not None:
                matches = bank_max_cosine(bank, config.layer, sae)
                entry["bank_max_cosine"] = {k: round(v[0], 4) for k, v in matches.items()}
                entry["bank_mean_max_cosine"] = float(np.mean([v[0] for v in matches.values()]))
            entries.append(entry)
        write_json(ctx.path("sae", "main", "metrics.json"), entries)
        return {"saes": len(entries), "tokens": result.tokens, "seconds": round(result.seconds, 2),
                "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
                **{k: entries[0][k] for k in ("l0", "fvu", "dead_fraction", "ce_loss_recovered")}}

    def outputs(self, ctx):
        return [ctx.path("sae")]

    def outputs_exist(self, ctx):
        return ctx.path("sae", "main", "metrics.json").is_file()


@dataclasses.dataclass(frozen=True)
class SteerSettings:
    """The run's steering evaluation and monitored sample (the `steer:` section)."""

    concepts: tuple[str, ...] = ("desperate", "calm", "afraid", "joyful")  # those in the bank are used
    strengths: tuple[float, ...] = unbounded((-0.2, -0.1, 0.0, 0.1, 0.2))  # fractions of the layer's mean norm
    prompts: tuple[str, ...] = ("I opened the letter and", "The meeting started late, and she",
                                "When the phone rang at midnight, he")
    max_new_tokens: int = positive(24)
    monitor_prompt: str = "The deadline was in an hour and nothing worked. She"
    monitor_new_tokens: int = positive(40)


class Steer(Stage):
    """Steering curves (evaluate_steering) and one monitored generation, for the report."""

    name = "steer"
    depends = ("fit",)

    def _config(self, ctx: Context) -> SteerSettings:
        return typed_section(SteerSettings, ctx.run_file, "steer", {})

    def settings(self, ctx):
        return {**output_settings("steer", self._config(ctx)), "layer": ctx.run_file.run.layer}

    def run(self, ctx):
        import numpy as np

        from emojax.concepts import load_bank
        from emojax.models import load_model
        from emojax.steer import Decoder, Readout
        from emojax.steer.commands import check_bank_model
        from emojax.steer.evaluate import SteeringEval, evaluate_steering
        from emojax.steer.text import encode_prompts, token_texts, tokenizer_for

        config = self._config(ctx)
        bank = load_bank(ctx.path("concepts"))
        lm = load_model(ctx.model)
        check_bank_model(lm, bank, warn=print)  # a bank of another model is refused, as by `emojax steer`
        report = json.loads(ctx.path("concepts", "eval.json").read_text())
        layer = ctx.run_file.run.layer or int(report.get("best_layer") or bank.layers[-1])
        concepts = [c for c in config.concepts if c in bank.names] or list(bank.names[:4])
        decoder = Decoder(lm)
        rows = evaluate_steering(lm, bank, concepts, list(config.prompts),
                                 SteeringEval(strengths=config.strengths, layer=layer,
                                              max_new_tokens=config.max_new_tokens), decoder=decoder)
        out = ctx.path("steer")
        write_text(out / "evaluation.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        curves = {"layer": layer, "read_layer": rows[0]["readout_layer"] if rows else layer, "concepts": {}}
        for c in concepts:
            mine = [r for r in rows if r["concept"] == c]
            curves["concepts"][c] = {"strengths": [r["strength"] for r in mine],
                                     "readout": [r["readout"] for r in mine],
                                     "fluency_ppl": [r["perplexity"] for r in mine],
                                     "logprob_shift": [r["logprob_shift"] for r in mine]}
        write_json(out / "curves.json", curves)

        tokenizer = tokenizer_for(lm)
        tokens, mask = encode_prompts(tokenizer, [config.monitor_prompt])
        gen = decoder.generate(tokens, mask, max_new_tokens=config.monitor_new_tokens,
                               readout=Readout(concepts=bank.at_layer(layer).astype(np.float32), index=layer))
        valid = np.asarray(gen.valid)[0]
        ids = np.asarray(gen.tokens)[0][valid]
        readings = np.asarray(gen.readings)[0][valid]
        monitor = {"text": tokenizer.decode(ids.tolist()), "tokens": token_texts(tokenizer, ids.tolist()),
                   "concepts": list(bank.names), "readings": np.round(readings, 5).tolist(), "layer": layer,
                   "prompt_tokens": int(np.asarray(mask).sum())}
        write_json(out / "monitor.json", monitor, indent=None)
        write_text(out / "generations.jsonl", json.dumps({"prompt": config.monitor_prompt, **monitor}) + "\n")
        strongest = max(rows, key=lambda r: abs(r["logprob_shift"])) if rows else {}
        return {"layer": layer, "concepts": concepts, "rows": len(rows),
                "largest_logprob_shift": strongest.get("logprob_shift")}

    def outputs_exist(self, ctx):
        return all(ctx.path("steer", f).is_file() for f in ("curves.json", "monitor.json"))


class Report(Stage):
    name = "report"
    depends = ("corpus", "dump", "fit", "sae", "steer")

    def settings(self, ctx):
        return {}

    def run(self, ctx):
        from emojax.report import build_report

        return {"path": str(build_report(ctx.run_dir))}

    def outputs_exist(self, ctx):
        return ctx.path("report", "index.html").is_file()


STAGES: dict[str, Stage] = {s.name: s for s in (Train(), Corpus(), Dump(), Fit(), SaeStage(), Steer(),
                                                  Report())}

# Sections typed by a stage config, and the keys `emojax run` sets itself (placeholders for the early check).
SECTION_CLASSES = {
    "corpus": ("emojax.corpus.config:CorpusConfig", {"out": "-", "tokenizer": "byte"}),
    "dump": ("emojax.store:DumpConfig", {"corpus": "-", "out": "-", "model": "-"}),
    "fit": ("emojax.concepts:FitConfig", {"store": "-", "out": "-", "model": "-"}),
    "sae": ("emojax.sae:SaeConfig", {"store": "-", "out": "-"}),
    "steer": ("emojax.run.stages:SteerSettings", {}),
}


def check_run_file(run_file: RunFile) -> None:
    """Types every section before anything runs, so a bad key fails in a second, not after the corpus stage."""
    import importlib

    from emojax.errors import CheckpointError
    from emojax.models.presets import BUILTIN_NAMES, RANDOM_PREFIX

    for name, (target, forced) in SECTION_CLASSES.items():
        module, cls = target.split(":")
        typed_section(getattr(importlib.import_module(module), cls), run_file, name, forced)
    if "train" in run_file.sections:
        Train()._config(Context(run_file=run_file, run_dir=Path(".")))
    model = run_file.run.model
    if model not in BUILTIN_NAMES and not model.startswith(RANDOM_PREFIX) and not Path(model).is_dir():
        raise CheckpointError(f"run.model={model!r}: no such checkpoint folder (or use builtin, builtin:tiny or "
                              "random:SHAPE)")
