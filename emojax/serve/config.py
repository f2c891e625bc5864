"""ServeConfig: the `serve:` section of a config file (`emojax serve --config FILE [key=value ...]`).

    serve:
      port: 8000
      rules: ["desperate>2:3 critical", "angry>2.5:3/8"]   # see emojax.steer.monitor.Rule.parse
      audit_log: /var/log/emojax/alerts.jsonl
      webhook: {url: "https://alerts.example/hook"}
      limits: {max_concurrent: 32}
      engine: {slots: 16}                                 # emojax.serve.engine.EngineConfig's keys
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from emojax.config_loader import config_section, non_negative, positive, ranged, unbounded
from emojax.errors import ConfigError, InputError
from emojax.serve.engine import EngineConfig
from emojax.steer.monitor import Rule

API_KEY_ENV = "EMOJAX_API_KEY"  # the bearer token when serve.api_key is empty
ALERT_SCOPES = ("generated", "all")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the server answers 413 (body) or 400 (tokens), and beyond
    max_concurrent requests in flight, 429."""

    max_body_bytes: int = positive(1_000_000)
    max_new_tokens: int = positive(512)  # a request's max_tokens above this is refused, not clipped
    max_prompt_tokens: int = positive(2048)  # /v1/monitor takes transcripts up to this + max_new_tokens
    max_concurrent: int = positive(64)  # requests in flight (streams count until they end)


@dataclass(frozen=True)
class Sampling:
    """A request's defaults when it names none (OpenAI's: temperature 1, top_p 1)."""

    max_tokens: int = positive(128)
    temperature: float = non_negative(1.0)
    top_p: float = ranged(1.0, 0, 1, lo_open=True)
    top_k: int = non_negative(0)  # 0: no limit


@dataclass(frozen=True)
class Webhook:
    """Each alert POSTed as JSON to `url` from a background queue: never in a request's way. Connection errors,
    timeouts, 429 and 5xx are retried `retries` times after backoff_s * 2**attempt (or the Retry-After)."""

    url: str = ""  # empty: no webhook
    timeout_s: float = positive(5.0)
    retries: int = non_negative(4)
    backoff_s: float = non_negative(0.5)
    queue_size: int = positive(1000)  # alerts waiting to be sent; beyond it an alert is dropped (and counted)


@config_section("serve")
@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = ranged(8000, 0, 65535)  # 0: any free port
    # bearer token every /v1 request must carry; empty: $EMOJAX_API_KEY, and none when that is unset
    api_key: str = field(default="", repr=False)
    model_name: str = ""  # the `model` in responses; empty: the --model argument
    limits: Limits = Limits()
    sampling: Sampling = Sampling()
    top_k: int = non_negative(5)  # concepts listed per token when a request does not say (emojax.top_k)
    strength_range: tuple[float, ...] = unbounded((-1.0, 1.0))  # [lo, hi] of a request's steering strengths
    rules: tuple[str, ...] = ()  # alert rules, e.g. "desperate>2:3 critical" (emojax.steer.monitor.Rule.parse)
    alert_scope: str = "generated"  # rules read generated tokens only, or "all" (the prompt too)
    audit_log: str = ""  # JSONL file every alert is appended to; empty: none
    webhook: Webhook = Webhook()
    shutdown_timeout_s: float = positive(30.0)  # SIGTERM: how long in-flight requests get to finish
    engine: EngineConfig = EngineConfig()  # slots, chunk_steps, max_context, prompt_buckets, max_queue

    def __post_init__(self):
        if len(self.strength_range) != 2 or not self.strength_range[0] < self.strength_range[1]:
            raise ConfigError(f"serve.strength_range={list(self.strength_range)} must be [lo, hi] with lo < hi")
        if self.alert_scope not in ALERT_SCOPES:
            raise ConfigError(f"serve.alert_scope={self.alert_scope!r} is not one of {list(ALERT_SCOPES)}")
        self.parsed_rules()

    def parsed_rules(self) -> tuple[Rule, ...]:
        rules = []
        for i, text in enumerate(self.rules):
            try:
                rules.append(Rule.parse(text))
            except InputError as e:
                raise ConfigError(f"serve.rules[{i}]: {e}") from None
        return tuple(rules)

    def bearer_token(self) -> str:
        """The token requests must carry: api_key, else $EMOJAX_API_KEY; "" when neither is set (no auth)."""
        return self.api_key or os.environ.get(API_KEY_ENV, "")
