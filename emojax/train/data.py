"""Training text (the built-in world, or the older story generator), its held-out documents, and token rows.

World (data=world): `n_documents` documents of the world's training kinds on its train situations, plus the
neutral dialogues of its train topics; held out: eval_fraction x n_documents documents of the same kinds written
on its val situations (new combinations of known situation parts), whose generation log-probabilities give the
world's own entropy over the held-out text. No val, test or implicit situation of the world is ever trained on.

Stories (data=stories): `n_stories` stories whose (concept, topic) pairs are spread evenly over every concept and
a seeded choice of topics, plus the neutral dialogues of every topic. Implicit-emotion scenarios are never
trained on (the corpus keeps them for validation). A document is held out when the hash of its doc_id falls
below `eval_fraction`, so the split does not depend on order or count.

Rows: each document becomes <bos> tokens <eos>; train documents are concatenated in a seeded order and cut
into rows of seq_len + 1 tokens (inputs are row[:-1], targets row[1:]). The batch at step s is a pure
function of (seed, s): an epoch is a seeded permutation of the rows, so resuming at step s reads exactly the
batches an uninterrupted run would. Held-out documents get rows of their own (a longer one continues in the
next row), so each is predicted from its own start: the figure the world's entropy is set against.

Fine-tuning samples (prompt/response, emojax.corpus.samples): one row per sample, padded to the longest, the loss
mask on the response's tokens; held out by hash of the sample id (`sample_token_data`).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from emojax.corpus.catalogue import load_catalogue
from emojax.corpus.generator import Document, neutral_dialogue, story
from emojax.corpus.samples import Sample
from emojax.errors import InputError
from emojax.tokenizer import Tokenizer
from emojax.train.bpe import BOS_ID, EOS_ID, PAD_ID
from emojax.train.config import TrainConfig
from emojax.world import World


def train_and_heldout(config: TrainConfig) -> tuple[list, list]:
    """(training documents, held-out documents) of `config`'s data, each in a fixed order. World documents are
    emojax.world.WorldDocument (with their log-probabilities), story ones emojax.corpus.generator.Document."""
    if config.data == "world":
        world = World(config.world)
        train = [d for d in world.training_documents(config.n_documents, config.neutral_per_topic)
                 if d.split == "train"]
        return train, world.heldout_documents(max(1, round(config.eval_fraction * config.n_documents)), "val")
    return split(documents(config), config.eval_fraction)


def documents(config: TrainConfig) -> list[Document]:
    """The story generator's training documents (data=stories), in a fixed order."""
    catalogue = load_catalogue()
    concepts, topics = catalogue.concepts, catalogue.topics
    rng = np.random.default_rng([config.corpus_seed, 7])
    # story i: concept i mod C; topics cycle through seeded permutations, so every topic is used about
    # equally often and (concept, topic, n) never repeats.
    order = np.concatenate([rng.permutation(len(topics)) for _ in range(-(-config.n_stories // len(topics)))])
    seen: dict[tuple[int, int], int] = {}
    docs = []
    for i in range(config.n_stories):
        c, t = i % len(concepts), int(order[i])
        n = seen.get((c, t), 0)
        seen[(c, t)] = n + 1
        docs.append(story(concepts[c], topics[t], n, config.corpus_seed, catalogue))
    for topic in topics:
        for k in range(min(config.neutral_per_topic, len(topic.dialogues))):
            docs.append(neutral_dialogue(topic, k))
    return docs


def is_heldout(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return h / 2 ** 64 < fraction


def split(docs: list[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_heldout(d.doc_id, eval_fraction)]
    heldout = [d for d in docs if is_heldout(d.doc_id, eval_fraction)]
    return train, heldout


def token_stream(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """<bos> text <eos> for every text, concatenated: int32 [N_tokens]."""
    encoded = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
    parts = [np.asarray([BOS_ID, *e.ids, EOS_ID], np.int32) for e in encoded]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def pack(stream: np.ndarray, row_len: int, pad_tail: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows [R, row_len] and a mask [R, row_len] (1 = real token). The last partial row is padded
    (pad_tail) or dropped (training: under one row of tokens)."""
    n_full = len(stream) // row_len
    rows = [stream[: n_full * row_len].reshape(n_full, row_len)]
    mask = [np.ones((n_full, row_len), np.int32)]
    tail = stream[n_full * row_len:]
    if pad_tail and len(tail):
        rows.append(np.pad(tail, (0, row_len - len(tail)), constant_values=PAD_ID)[None])
        mask.append((np.arange(row_len) < len(tail)).astype(np.int32)[None])
    return np.concatenate(rows), np.concatenate(mask)


@dataclasses.dataclass(frozen=True)
class TokenData:
    """Rows of T + 1 tokens: train [R, T+1] and held-out [E, T+1], with masks [., T+1] where token j >= 1 of a row
    is a counted target when its mask is 1. train_mask None: every target of the packed rows counts."""

    train: np.ndarray
    heldout: np.ndarray
    heldout_mask: np.ndarray
    n_train_docs: int
    n_heldout_docs: int
    train_tokens_dropped: int  # the tail of the train stream shorter than one row
    train_mask: np.ndarray | None = None

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows of step `step` [batch_size, T+1] and their mask (None when train_mask is): a pure function of
        (step, seed)."""
        n = len(self.train)
        idx = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, pos = idx // n, idx % n
        rows = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([seed, int(e)]).permutation(n)
            sel = epochs == e
            rows[sel] = perm[pos[sel]]
        return self.train[rows], None if self.train_mask is None else self.train_mask[rows]


def document_rows(texts: list[str], tokenizer: Tokenizer, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [R, row_len] and mask [R, row_len] with each text's <bos> tokens <eos> starting a row of its own (a
    longer one continues in the next rows; the last is padded)."""
    parts = [pack(token_stream([t], tokenizer), row_len, pad_tail=True) for t in texts]
    if not parts:
        return np.zeros((0, row_len), np.int32), np.zeros((0, row_len), np.int32)
    return np.concatenate([r for r, _ in parts]), np.concatenate([m for _, m in parts])


def build_token_data(config: TrainConfig, tokenizer: Tokenizer, train_docs: list, heldout_docs: list) -> TokenData:
    rng = np.random.default_rng([config.seed, 11])
    shuffled = [train_docs[i] for i in rng.permutation(len(train_docs))]
    row_len = config.seq_len + 1
    train_stream = token_stream([d.text for d in shuffled], tokenizer)
    train, _ = pack(train_stream, row_len, pad_tail=False)
    heldout, heldout_mask = document_rows([d.text for d in heldout_docs], tokenizer, row_len)
    if len(train) < 1:
        raise ValueError(f"the training text gives {len(train_stream)} tokens, under one row of {row_len}")
    return TokenData(train=train, heldout=heldout, heldout_mask=heldout_mask, n_train_docs=len(train_docs),
                     n_heldout_docs=len(heldout_docs), train_tokens_dropped=len(train_stream) % row_len)


def sample_token_data(samples: list[Sample], tokenizer: Tokenizer, eos_id: int | None, eval_fraction: float,
                      max_positions: int) -> TokenData:
    """Fine-tuning rows: each sample's prompt + response ids (+ `eos_id`) in a row of its own, right-padded to the
    longest sample; the mask is 1 on the response's tokens (and the <eos>), the only targets the loss counts.
    A sample is held out when the hash of its id falls below `eval_fraction` (as is_heldout). Raises InputError
    naming the sample that does not fit the model's `max_positions`, or when either side of the split is empty."""
    encoded = []
    for sample in samples:
        ids, n_prompt = sample.token_ids(tokenizer)
        ids = ids + ([eos_id] if eos_id is not None else [])
        if len(ids) - 1 > max_positions:
            raise InputError(f"{sample.where}: sample {sample.sample_id!r} is {len(ids)} tokens; the model reads at "
                             f"most {max_positions} (max_position_embeddings) plus the last target: shorten it")
        encoded.append((is_heldout(sample.sample_id, eval_fraction), ids, n_prompt))
    row_len = max(len(ids) for _, ids, _ in encoded)

    def rows(part: list) -> tuple[np.ndarray, np.ndarray]:
        tokens, mask = np.full((len(part), row_len), PAD_ID, np.int32), np.zeros((len(part), row_len), np.int32)
        for k, (_, ids, n_prompt) in enumerate(part):
            tokens[k, :len(ids)] = ids
            mask[k, n_prompt:len(ids)] = 1
        return tokens, mask

    train, heldout = [e for e in encoded if not e[0]], [e for e in encoded if e[0]]
    if not train or not heldout:
        raise InputError(f"finetune.eval_fraction={eval_fraction} holds out {len(heldout)} of {len(samples)} "
                         "samples (by hash of their ids); both the training and the held-out part must be non-empty: "
                         "change eval_fraction or give more samples")
    (train_rows, train_mask), (heldout_rows, heldout_mask) = rows(train), rows(heldout)
    return TokenData(train=train_rows, heldout=heldout_rows, heldout_mask=heldout_mask, n_train_docs=len(train),
                     n_heldout_docs=len(heldout), train_tokens_dropped=0, train_mask=train_mask)
