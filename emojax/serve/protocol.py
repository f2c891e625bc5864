"""The OpenAI-compatible wire format of `emojax serve`: request bodies checked and turned into a
GenerationRequest, and the per-token `emojax` entries of responses.

A request may carry, beside OpenAI's fields, `emojax`: {"top_k": 5, "full": false, "prompt": false,
"steer": {"desperate": 0.1}}: concepts listed per token, the whole reading vector per token (in the order of
`emojax.concepts`), the prompt's tokens with their readings, and steering strengths (the bank's concepts, in
the bank's steering unit, within serve.strength_range). Every problem a client can cause is an ApiError whose
`param` names the field at fault.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emojax.errors import EmojaxError
from emojax.serve.config import ServeConfig
from emojax.serve.types import GenerationRequest
from emojax.steer.monitor import Rule
from emojax.tokenizer import Tokenizer, chat_prompt

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_SEED = 2**31 - 1


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(None, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad(None, f"the body must be a JSON object, got {type(body).__name__}")
    return body


# ---- field checks


def _integer(body: dict, key: str, lo: int, hi: int | None, default: int | None, param: str | None = None):
    value = body.get(key)
    param = param or key
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                          and not value.is_integer()):
        raise bad(param, f"{param} must be a whole number, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise bad(param, f"{param}={value} is out of range: it must be in [{lo}, {hi}]" if hi is not None else
                  f"{param}={value} is out of range: it must be >= {lo}")
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float | None = None, lo_open: bool = False,
            param: str | None = None) -> float:
    value = body.get(key)
    param = param or key
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(param, f"{param} must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        bound = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise bad(param, f"{param}={value:g} is out of range: it must be {'in ' if hi is not None else ''}{bound}")
    return float(value)


def _flag(body: dict, key: str, default: bool, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(param or key, f"{param or key} must be true or false, got {value!r}")
    return value


# ---- the emojax field


@dataclass(frozen=True)
class Options:
    """What a request asks of the monitor: top_k concepts per token, the full vector, the prompt's tokens."""

    top_k: int
    full: bool = False
    prompt: bool = False
    steer: tuple[tuple[str, float], ...] = ()


def parse_options(body: dict, names: Sequence[str], config: ServeConfig, steering: bool = True) -> Options:
    spec = body.get("emojax")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise bad("emojax", f"emojax must be an object like {{\"top_k\": 5, \"steer\": {{...}}}}, got {spec!r}")
    known = ("top_k", "full", "prompt", "steer") if steering else ("top_k", "full")
    for key in spec:
        if key not in known:
            raise bad(f"emojax.{key}", f"emojax.{key} is not a setting; emojax takes {', '.join(known)}")
    top_k = _integer(spec, "top_k", 0, len(names), min(config.top_k, len(names)), "emojax.top_k")
    full = _flag(spec, "full", False, "emojax.full")
    prompt = _flag(spec, "prompt", False, "emojax.prompt")
    steer = parse_steer(spec.get("steer"), names, config) if steering else ()
    return Options(top_k=top_k, full=full, prompt=prompt, steer=steer)


def parse_steer(steer, names: Sequence[str], config: ServeConfig) -> tuple[tuple[str, float], ...]:
    if steer is None:
        return ()
    if not isinstance(steer, dict):
        raise bad("emojax.steer", f"emojax.steer must be an object of concept: strength, got {steer!r}")
    lo, hi = config.strength_range
    out = []
    for concept in steer:
        param = f"emojax.steer.{concept}"
        if concept not in names:
            raise bad(param, f"{concept!r} is not a concept of the bank (concepts: {', '.join(names)})")
        if steer[concept] is None:
            raise bad(param, f"{param} must be a number (a strength), got null")
        out.append((concept, _number(steer, concept, 0.0, lo, hi, param=param)))
    return tuple(out)


def parse_rules(body: dict) -> tuple[Rule, ...] | None:
    """A request's own `rules` (strings, as in serve.rules), or None to use the server's."""
    rules = body.get("rules")
    if rules is None:
        return None
    if not isinstance(rules, list):
        raise bad("rules", f"rules must be a list of rules like \"desperate>2:3\", got {rules!r}")
    out = []
    for i, text in enumerate(rules):
        if not isinstance(text, str):
            raise bad(f"rules[{i}]", f"rules[{i}] must be text like \"desperate>2:3\", got {text!r}")
        try:
            out.append(Rule.parse(text))
        except EmojaxError as e:
            raise bad(f"rules[{i}]", str(e)) from None
    return tuple(out)


# ---- prompts


def _text_content(content, param: str) -> str:
    """A message's content: text, or OpenAI's list of parts of which only {"type": "text"} ones are taken."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{param}[{i}]", f"{param}[{i}] must be a text part {{\"type\": \"text\", \"text\": ...}}")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(param, f"{param} must be text, got {content!r}")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        if m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {list(ROLES)}, got {m.get('role')!r}")
        out.append({"role": m["role"], "content": _text_content(m.get("content"), f"messages[{i}].content")})
    return out


def chat_ids(body: dict, tokenizer: Tokenizer) -> list[int]:
    try:
        return tokenizer.encode_prompt(chat_prompt(chat_messages(body), tokenizer))
    except EmojaxError as e:  # the checkpoint's chat template refused these messages
        raise bad("messages", str(e)) from None


def _token_ids(value, param: str, vocab_size: int) -> list[int]:
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise bad(param, f"{param}[{i}]={t!r} is not a token id in [0, {vocab_size})")
    return list(value)


def completion_ids(body: dict, tokenizer: Tokenizer, key: str = "prompt") -> list[int]:
    """`prompt`: text, a list holding one text, token ids, or a list holding one list of token ids."""
    prompt = body.get(key)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return _token_ids(prompt, key, tokenizer.vocab_size)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad(key, f"{key}: one prompt per request (got {len(prompt)}); send one request each")
    raise bad(key, f"{key} must be text or a list of token ids, got {prompt!r}")


def check_length(ids: list[int], param: str, limit: int, setting: str) -> None:
    if not ids:
        raise bad(param, f"{param} encodes to no tokens")
    if len(ids) > limit:
        raise bad(param, f"{param} is {len(ids)} tokens; the limit is {limit} ({setting})")


def stop_ids(body: dict, tokenizer: Tokenizer, end_ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """The model's end-of-text ids (`end_ids`; None: the tokenizer's eos_token when it names one), plus each `stop`
    string that is a single token."""
    if end_ids is None:
        eos = getattr(tokenizer, "eos_token", "")
        end_ids = [tokenizer.token_to_id(eos)] if eos and tokenizer.token_to_id(eos) is not None else []
    ids = [int(t) for t in end_ids]
    stop = body.get("stop")
    if stop is None:
        return tuple(ids)
    texts = [stop] if isinstance(stop, str) else stop
    if not isinstance(texts, list) or not all(isinstance(s, str) and s for s in texts) or len(texts) > MAX_STOP:
        raise bad("stop", f"stop must be text or a list of up to {MAX_STOP} texts, got {stop!r}")
    for text in texts:
        token = tokenizer.token_to_id(text)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if token is None and len(encoded) == 1:
            token = encoded[0]
        if token is None:
            raise bad("stop", f"stop {text!r} is {len(encoded)} tokens; emojax serve stops on single tokens only")
        ids.append(int(token))
    return tuple(dict.fromkeys(ids))


# ---- a whole generation request


@dataclass(frozen=True)
class Generation:
    request: GenerationRequest
    options: Options
    stream: bool
    include_usage: bool
    prompt_param: str  # "prompt" or "messages": the field a prompt problem is named by


def parse_generation(body: dict, chat: bool, tokenizer: Tokenizer, names: Sequence[str], config: ServeConfig,
                     request_id: str, end_ids: Sequence[int] | None = None) -> Generation:
    """A /v1/completions (chat=False) or /v1/chat/completions body as a GenerationRequest, checked against the
    limits and the bank; raises ApiError (400) naming the field at fault. end_ids: as in `stop_ids`."""
    if body.get("n") not in (None, 1):
        raise bad("n", "n must be 1: one choice per request")
    if body.get("logprobs") not in (None, False) or body.get("echo"):
        key = "echo" if body.get("echo") else "logprobs"
        raise bad(key, f"{key} is not supported by emojax serve (per-token readings are in the emojax field)")
    prompt_param = "messages" if chat else "prompt"
    ids = chat_ids(body, tokenizer) if chat else completion_ids(body, tokenizer)
    check_length(ids, prompt_param, config.limits.max_prompt_tokens, "serve.limits.max_prompt_tokens")
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, max_key, 1, None, min(config.sampling.max_tokens, config.limits.max_new_tokens))
    if max_tokens > config.limits.max_new_tokens:
        raise bad(max_key, f"{max_key}={max_tokens} is above this server's limit of {config.limits.max_new_tokens} "
                           "(serve.limits.max_new_tokens)")
    s = config.sampling
    stream = _flag(body, "stream", False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options", f"stream_options must be an object, got {stream_options!r}")
    seed = _integer(body, "seed", 0, MAX_SEED, None)
    options = parse_options(body, names, config)
    request = GenerationRequest(
        request_id=request_id, prompt_ids=tuple(int(i) for i in ids), max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", s.temperature, 0.0),
        top_k=_integer(body, "top_k", 0, None, s.top_k),
        top_p=_number(body, "top_p", s.top_p, 0.0, 1.0, lo_open=True),
        seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
        steering=options.steer, stop_ids=stop_ids(body, tokenizer, end_ids))
    return Generation(request=request, options=options, stream=stream,
                      include_usage=_flag(stream_options, "include_usage", False, "stream_options.include_usage"),
                      prompt_param=prompt_param)


def monitor_ids(body: dict, tokenizer: Tokenizer, config: ServeConfig) -> tuple[list[int], str]:
    """The transcript of a /v1/monitor body: `text`, chat `messages`, or `tokens` (ids); and its field's name."""
    given = [k for k in ("text", "messages", "tokens") if body.get(k) is not None]
    if len(given) != 1:
        raise bad(given[1] if len(given) > 1 else "text",
                  "give the transcript as one of text, messages (chat) or tokens (ids)")
    (key,) = given
    if key == "messages":
        ids = chat_ids(body, tokenizer)
    elif key == "text":
        if not isinstance(body["text"], str):
            raise bad("text", f"text must be text, got {body['text']!r}")
        ids = tokenizer.encode(body["text"])
    else:
        if not isinstance(body["tokens"], list):
            raise bad("tokens", f"tokens must be a list of token ids, got {body['tokens']!r}")
        ids = _token_ids(body["tokens"], "tokens", tokenizer.vocab_size)
    limit = config.limits.max_prompt_tokens + config.limits.max_new_tokens
    check_length(ids, key, limit, "serve.limits.max_prompt_tokens + max_new_tokens")
    return ids, key


# ---- responses


def _value(v: float) -> float | None:
    return round(float(v), 4) if math.isfinite(v) else None


def token_entry(position: int, token_id: int, text: str, readings_C: np.ndarray, names: Sequence[str],
                options: Options) -> dict:
    """One token of a response's emojax field: position (0 = the first prompt token), id, text, the top_k
    concepts by reading ([[name, value], ...], highest first) and, with options.full, every reading."""
    r = np.asarray(readings_C, np.float32)
    entry = {"position": position, "token": int(token_id), "text": text}
    if options.top_k:
        order = np.argsort(-np.nan_to_num(r, nan=-np.inf), kind="stable")[:options.top_k]
        entry["top"] = [[names[i], _value(r[i])] for i in order]
    if options.full:
        entry["readings"] = [_value(v) for v in r]
    return entry


class TextStream:
    """Incremental detokenisation: the text each new token adds, holding back bytes of an unfinished character
    (a byte-level tokenizer splits one character over several tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] are decoded as context, ids[_read:] are not yet sent
        self._read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end becomes U+FFFD), at the end of a reply."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
