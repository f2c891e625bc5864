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

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>"):
        self.backend = backend
        self.source = source

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
        encoded = [self.encode(t, add_special_tokens) for t in texts]
        T = length or max(1, max(len(e) for e in encoded))
        tokens = np.full((len(texts), T), pad_id, np.int32)
        mask = np.zeros((len(texts), T), np.int32)
        for row, ids in enumerate(encoded):
            ids = ids[-T:]
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
    return Tokenizer.from_file(path)
