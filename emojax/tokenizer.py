"""Tokenization through the `tokenizers` library (the tokenizer.json of a Hugging Face checkpoint)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers

from emojax.errors import CheckpointError


class Tokenizer:
    """encode/decode plus left-padded batching for the model's [B, T] inputs."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>", chat_template: str | None = None,
                 special: dict[str, str] | None = None):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template  # Jinja, from the checkpoint's tokenizer_config.json or chat_template.jinja
        self.bos_token = (special or {}).get("bos_token", "")
        self.eos_token = (special or {}).get("eos_token", "")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)), source=str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: a chat-template rendering carries its own special tokens, plain text gets the usual."""
        return self.encode(text, add_special_tokens=not self.chat_template)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: equal fingerprints tokenize identically."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    @property
    def bos_id(self) -> int | None:
        """The token `encode` puts before every text (a BOS), or None when it adds none."""
        plain, special = self.encode("a", add_special_tokens=False), self.encode("a")
        return special[0] if len(special) > len(plain) and special[1:len(plain) + 1] == plain else None

    def batch(self, texts: Sequence[str], length: int | None = None, pad_id: int = 0,
              add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int32 tokens [B, T] and attention mask [B, T] (T = longest text, or `length`).

        Texts longer than `length` keep their last `length` tokens.
        """
        return left_pad([self.encode(t, add_special_tokens) for t in texts], length, pad_id)


def left_pad(sequences: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token id sequences as left-padded int32 tokens [rows, T] and attention mask [rows, T] (T = the longest,
    or `length`; a longer sequence keeps its last T ids; rows beyond the sequences stay empty)."""
    T = length or max(1, max((len(ids) for ids in sequences), default=1))
    n = len(sequences) if rows is None else rows
    tokens = np.full((n, T), pad_id, np.int32)
    mask = np.zeros((n, T), np.int32)
    for row, ids in enumerate(sequences):
        ids = list(ids)[-T:]
        if ids:
            tokens[row, T - len(ids):] = ids
            mask[row, T - len(ids):] = 1
    return tokens, mask


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids 0..255, plus BOS = 256 and PAD = 257: works for any text, needs no file."""

    BOS, PAD = 256, 257

    def __init__(self):
        self.backend = None
        self.source = "byte"
        self.chat_template, self.bos_token, self.eos_token = None, "", ""

    @property
    def vocab_size(self) -> int:
        return 258

    bos_id = BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        data = token.encode("utf-8")
        return data[0] if len(data) == 1 else None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"emojax-byte-tokenizer-v1").hexdigest()


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """"byte", a tokenizer.json file, or a checkpoint directory holding one."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{spec}: no tokenizer.json (pass a tokenizer.json, a checkpoint directory, or 'byte')")
    tokenizer = Tokenizer.from_file(path)
    tokenizer.chat_template, special = chat_settings(path.parent)
    tokenizer.bos_token, tokenizer.eos_token = special.get("bos_token", ""), special.get("eos_token", "")
    return tokenizer


def chat_settings(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The chat template (chat_template.jinja, else tokenizer_config.json's chat_template: a string or the
    "default" of a named list) and the BOS/EOS token strings, as transformers reads them; (None, {}) if absent."""
    import json

    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot read ({e})") from None
    special = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) and template.strip() else None), special


def chat_prompt(messages: Sequence[dict], tokenizer: Tokenizer | None = None) -> str:
    """The text a model reads for chat `messages` ({role: system|user|assistant, content}): the tokenizer's chat
    template when it has one (Jinja, sandboxed as transformers renders it), else the study's frame: the system
    text, then "Human: ..." and "Assistant: ..." turns separated by blank lines, ending "Assistant:". A trailing
    assistant message is a prefill the reply continues (no end of turn after it). Encode the result with
    `Tokenizer.encode_prompt` (a template carries its own special tokens)."""
    prefill = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None
    turns = list(messages[:-1] if prefill is not None else messages)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(template).render(messages=turns, add_generation_prompt=True,
                                                     bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        except TemplateError as e:
            raise CheckpointError(f"{tokenizer.source}: its chat template failed on these messages ({e})") from None
        return text + (prefill or "")
    parts = []
    for m in turns:
        parts.append(m["content"] if m["role"] == "system" else
                     f"Human: {m['content']}" if m["role"] == "user" else f"Assistant: {m['content']}")
    if prefill is None:
        parts.append("Assistant:")
    else:
        parts.append("Assistant:" + ("" if not prefill or prefill.startswith(" ") else " ") + prefill)
    return "\n\n".join(parts)
