"""`emojax serve --model M --bank B [--layer N] [--config FILE] [key=value ...]`: loads the model and the bank,
starts the engine and serves it over HTTP (emojax.serve.app) until SIGTERM, which drains it."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP with live concept readings, alerts and steering",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, streaming or not) whose "
                    "responses carry each token's concept readings and the alerts of the config's rules, with "
                    "per-request steering; /v1/monitor scores a transcript; /metrics, /healthz, and a monitoring "
                    "page at /. Settings: the config's serve: section and key=value overrides, e.g. port=8080 "
                    "'rules=[\"desperate>2:3 critical\"]' engine.slots=16. SIGTERM stops admitting (503), lets "
                    "requests in flight finish (serve.shutdown_timeout_s) and flushes the audit log.")
    p.add_argument("--model", required=True, help="Hugging Face-format directory, or a preset such as random:tiny")
    p.add_argument("--bank", required=True, help="concept bank folder (emojax fit's output)")
    p.add_argument("--layer", type=int, help="residual index to read and steer at (default: the bank's layer)")
    p.add_argument("--config", help="YAML config (its serve: section)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--metric", choices=["z", "cosine", "dot"],
                   help="the readings' unit (default: z-scores for a calibrated bank, else the centred cosine)")
    p.add_argument("--force", action="store_true", help="use a bank fitted on another model")
    p.add_argument("overrides", nargs="*", help="key=value settings of the serve section")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from emojax.concepts.bank import load_bank
    from emojax.concepts.layer import bank_layer
    from emojax.config_loader import load_section
    from emojax.models import load_model
    from emojax.models.lm import stop_tokens
    from emojax.serve.app import create_app
    from emojax.serve.config import ServeConfig
    from emojax.serve.engine import Engine
    from emojax.serve.server import run_server
    from emojax.steer.generate import check_bank_model
    from emojax.steer.monitor import AlertTracker
    from emojax.steer.text import tokenizer_for

    def warn(message: str) -> None:
        print(f"emojax: warning: {message}", file=sys.stderr)

    config = load_section(ServeConfig, args.config, args.overrides)
    if not config.model_name:
        config = dataclasses.replace(config, model_name=str(args.model))
    bank = load_bank(args.bank)
    AlertTracker(config.parsed_rules(), bank.names)  # a rule on a concept the bank lacks: refused before loading
    lm = load_model(args.model, dtype=args.dtype)
    check_bank_model(lm, bank, force=args.force, warn=warn)
    layer = bank_layer(bank, lm.config.n_layers, args.layer)
    engine = Engine(lm, bank, layer, config.engine, metric=args.metric)
    app = create_app(engine, tokenizer_for(lm), config, end_ids=stop_tokens(lm))
    print(f"emojax serve: {args.model}, {len(bank.names)} concepts at residual index {layer}, "
          f"{config.engine.slots} slots; http://{config.host}:{config.port}/", file=sys.stderr)
    run_server(app)
    return 0
