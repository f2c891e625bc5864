"""The stages of `emojax run`, each a thin adapter from the run file to one stage's library function.

A stage says which settings it runs with (its fingerprint, with its dependencies' fingerprints), which
outputs it owns (removed when its inputs change) and how to tell they are complete.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from emojax.run.config import RunFile, typed_section


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
        """The checkpoint every stage reads (for a built-in preset: the folder the train stage produced)."""
        if "train" in self.results and self.results["train"].get("path"):
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


class Train(Stage):
    """Trains the built-in model on first use (cached across runs); a no-op for a given checkpoint."""

    name = "train"

    def _config(self, ctx: Context):
        from emojax.models.presets import BUILTIN_NAMES
        from emojax.train.config import load_train_config

        model = ctx.run_file.run.model
        if model not in BUILTIN_NAMES:
            return None
        values = ctx.run_file.section("train")
        overrides = [f"preset={values.pop('preset', BUILTIN_NAMES[model])}"]
        overrides += [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in values.items()]
        return load_train_config(None, overrides)

    def settings(self, ctx):
        config = self._config(ctx)
        return {"model": ctx.run_file.run.model} if config is None else {"train": config.fingerprint()}

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
        path = ctx.results.get("train", {}).get("path", "")
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
        config = self._config(ctx)
        return {"corpus": config.fingerprint()}

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
        config = self._config(ctx)
        return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("corpus", "out", "model")}

    def run(self, ctx):
        from emojax.store import dump

        config = self._config(ctx)
        state = dump(config, show_progress=ctx.show_progress, log=lambda m: print(m))
        summary = json.loads(ctx.path("activations", "summary", "process-000.json").read_text())
        return {"layers": state["layers"], "n_docs": state["n_docs"], "n_tokens": state["n_tokens"],
                "short_docs": state.get("short_docs"), **summary}

    def outputs(self, ctx):
        return [ctx.path("activations")]

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
        config = self._config(ctx)
        return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("store", "out", "model")}

    def run(self, ctx):
        from emojax.concepts import fit

        bank = fit(self._config(ctx), log=print)
        report = json.loads(ctx.path("concepts", "eval.json").read_text())
        return {"concepts": len(bank.names), "layers": list(bank.layers), "best_layer": report.get("best_layer")}

    def outputs(self, ctx):
        return [ctx.path("concepts")]

    def outputs_exist(self, ctx):
        return all(ctx.path("concepts", f).is_file() for f in ("bank.json", "bank.safetensors", "eval.json"))


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


STAGES: dict[str, Stage] = {s.name: s for s in (Train(), Corpus(), Dump(), Fit(), Report())}

# Sections typed by a stage config, and the keys `emojax run` sets itself (placeholders for the early check).
SECTION_CLASSES = {
    "corpus": ("emojax.corpus.config:CorpusConfig", {"out": "-", "tokenizer": "byte"}),
    "dump": ("emojax.store:DumpConfig", {"corpus": "-", "out": "-", "model": "-"}),
    "fit": ("emojax.concepts:FitConfig", {"store": "-", "out": "-", "model": "-"}),
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
