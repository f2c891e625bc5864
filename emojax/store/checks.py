"""What the dump refuses before it writes anything wrong: a corpus tokenized by another tokenizer, documents
longer than the model's position limit (before any compute), and non-finite activations (checked on device per
batch). Each is a DumpError naming the file, shard, document and what to do."""

from __future__ import annotations

import numpy as np

from emojax.errors import EmojaxError
from emojax.store import corpus_shards
from emojax.store.config import DumpConfig
from emojax.store.writer import layer_name
from emojax.tokenizer import load_tokenizer


class DumpError(EmojaxError):
    """A dump that cannot start or continue (mismatched store, tokenizer or settings)."""


def check_tokenizer(config: DumpConfig, lm, manifest: dict):
    """The tokenizer this model reads (a Tokenizer or ByteTokenizer), which must be the one that tokenized the
    corpus."""
    if config.tokenizer:
        tokenizer, name = load_tokenizer(config.tokenizer), config.tokenizer
    elif lm.tokenizer is not None:
        tokenizer, name = lm.tokenizer, f"the tokenizer.json of {lm.source}"
    else:
        tokenizer, name = load_tokenizer("byte"), "byte (the default for a model without tokenizer.json)"
    if tokenizer.fingerprint != manifest["tokenizer_sha256"]:
        raise DumpError(f"{corpus_shards.join(config.corpus, 'manifest.json')}: the corpus was tokenized with "
                        f"{manifest.get('tokenizer')!r} (sha256 {manifest['tokenizer_sha256'][:12]}), but the dump "
                        f"uses {name} (sha256 {tokenizer.fingerprint[:12]}); rebuild the corpus with "
                        "corpus.tokenizer set to the model's tokenizer, or set dump.tokenizer")
    return tokenizer


def check_positions(config: DumpConfig, lm, manifest: dict) -> None:
    """Documents longer than the model's position limit are refused before any compute (a learned position
    table would give NaN past its end, rotary embeddings values the model never saw). The corpus truncates to
    max_tokens, so only a corpus with max_tokens above the limit needs its (length-only) columns read."""
    limit, _ = lm.config.position_limit
    if int(manifest["max_tokens"]) <= limit:
        return
    for info in manifest["shards"]:
        doc_ids, lengths = corpus_shards.read_lengths(config.corpus, info)
        refuse_too_long(info["name"], doc_ids, lengths, lm.config)


def refuse_too_long(shard: str, doc_ids: list[str], lengths: np.ndarray, cfg) -> None:
    limit, key = cfg.position_limit
    too_long = np.flatnonzero(np.asarray(lengths) > limit)
    if len(too_long):
        i = int(too_long[0])
        more = f" (and {len(too_long) - 1} more in this shard)" if len(too_long) > 1 else ""
        raise DumpError(f"{shard}: document {doc_ids[i]!r} has {int(lengths[i])} tokens{more}, more than the "
                        f"model's position limit ({key}={limit} in its config); rebuild the corpus with "
                        f"corpus.max_tokens <= {limit}")


def refuse_non_finite(shard: corpus_shards.CorpusShard, docs: np.ndarray, layers: tuple[int, ...],
                       finite_LB: np.ndarray) -> None:
    """A NaN or inf stops the dump before it is stored; the shard stays incomplete, so a rerun redoes it."""
    li = int(np.flatnonzero(~finite_LB.all(axis=1))[0])
    bad = [shard.doc_ids[int(docs[j])] for j in np.flatnonzero(~finite_LB[li])]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise DumpError(f"{shard.name}: non-finite activations (NaN or inf) at {layer_name(layers[li])} (residual "
                    f"index {layers[li]}) for document(s) {', '.join(repr(d) for d in bad[:5])}{more}; nothing of "
                    "this shard was recorded. Check the checkpoint's weights, or set dump.model_dtype=float32 if "
                    "a narrower dtype overflows")
