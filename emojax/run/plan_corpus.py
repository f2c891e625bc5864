"""The corpus half of `emojax plan`: documents and tokens, without generating or reading the corpus.

The built-in generator's document count is exact arithmetic on its config (before the build's validation and
deduplication, which drop a few; for the world, an upper bound on implicit scenarios, as an emotion that is the
mode of no implicit situation gets none). Tokens are the count times a mean per document measured on a small, fixed
sample of generated documents, tokenized as the corpus stage would (capped at max_tokens). For `corpus.inputs`
rows are counted when that is cheap (Parquet footers, small text files) and extrapolated from the first MiB
otherwise; tokens there come from file sizes. Every figure that is not exact says so in `how`.
"""

from __future__ import annotations

import glob
import os

from emojax.corpus.catalogue import load_catalogue
from emojax.corpus.generator import implicit_scenarios, neutral_dialogue, story
from emojax.world import World

BYTES_PER_BPE_TOKEN = 4.0  # typical of a BPE tokenizer on English text; used when the tokenizer is not here
SAMPLE = {"story": 48, "neutral": 16, "implicit": 16}  # documents tokenized per kind
COUNT_LIMIT = 64 * 2**20  # text inputs up to this size are counted line by line


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    return sorted({i * n // k for i in range(min(n, k))})


def generator_documents(generator) -> tuple[dict, dict]:
    """(documents per kind, a small sample of documents per kind) of the built-in generator's config."""
    if generator.kind == "world":
        return _world_documents(generator)
    catalogue = load_catalogue()
    concepts = [catalogue.concept(n) for n in generator.concepts] if generator.concepts else list(catalogue.concepts)
    topics = catalogue.topics[: generator.n_topics]
    per_concept = len(topics) * generator.stories_per_topic
    counts = {
        "story": len(concepts) * per_concept,
        "neutral": sum(min(generator.neutral_per_topic, len(t.dialogues)) for t in topics),
        "implicit": sum(len(c.scenarios) for c in concepts) if generator.implicit else 0,
    }
    sample = {"story": [], "neutral": [], "implicit": []}
    for i in _spread(counts["story"], SAMPLE["story"]):
        c, rest = divmod(i, per_concept)
        t, n = divmod(rest, generator.stories_per_topic)
        sample["story"].append(story(concepts[c], topics[t], n, generator.seed, catalogue).text)
    neutral = [(t, k) for t in topics for k in range(min(generator.neutral_per_topic, len(t.dialogues)))]
    sample["neutral"] = [neutral_dialogue(*neutral[i]).text for i in _spread(len(neutral), SAMPLE["neutral"])]
    implicit = [d.text for c in concepts for d in implicit_scenarios(c)] if generator.implicit else []
    sample["implicit"] = [implicit[i] for i in _spread(len(implicit), SAMPLE["implicit"])]
    return counts, sample


def _world_documents(generator) -> tuple[dict, dict]:
    catalogue = load_catalogue()
    emotions = generator.world_emotions()
    fit = [(split, e, n) for split, count in zip(("train", "val", "test"), generator.stories_per_emotion)
           for e in emotions for n in range(count)]
    implicit = [(e, n) for e in emotions for n in range(generator.implicit_per_emotion)] if generator.implicit else []
    neutral = [(t, k) for t, topic in enumerate(catalogue.topics)
               for k in range(min(generator.neutral_per_topic, len(topic.dialogues)))]
    counts = {"story": len(fit), "neutral": len(neutral), "implicit": len(implicit)}
    world = World(generator.world)
    sample = {"story": [world.fit_story(e, n, split).text for split, e, n in
                        (fit[i] for i in _spread(len(fit), SAMPLE["story"]))],
              "neutral": [world.neutral_dialogue(*neutral[i]).text for i in _spread(len(neutral), SAMPLE["neutral"])],
              "implicit": [doc.text for i in _spread(len(implicit), SAMPLE["implicit"])
                           if (doc := world.implicit_scenario(*implicit[i])) is not None]}
    return counts, sample


def _token_counter(tokenizer: str | None, max_tokens: int):
    """(text -> tokens, in words) for the run's tokenizer; None: bytes / BYTES_PER_BPE_TOKEN."""
    if tokenizer is None:
        return (lambda text: min(max_tokens, 1 + round(len(text.encode()) / BYTES_PER_BPE_TOKEN)),
                f"~{BYTES_PER_BPE_TOKEN:g} bytes per token (the run's tokenizer is not on this machine)")
    from emojax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return (lambda text: min(max_tokens, len(tok.encode(text))),
            "the byte tokenizer" if tokenizer == "byte" else f"the tokenizer in {tokenizer}")


def corpus_size(corpus, tokenizer: str | None) -> dict:
    """Documents and estimated tokens of a CorpusConfig's corpus; `tokenizer` as ResolvedModel.tokenizer."""
    if corpus.inputs:
        return _inputs_size(corpus, tokenizer)
    count, tokenizer_words = _token_counter(tokenizer, corpus.max_tokens)
    counts, sample = generator_documents(corpus.generator)
    means = {kind: sum(map(count, texts)) / len(texts) for kind, texts in sample.items() if texts}
    tokens = round(sum(counts[kind] * means.get(kind, 0.0) for kind in counts))
    documents = sum(counts.values())
    return {"source": f"built-in generator ({corpus.generator.kind})", "documents": documents,
            "documents_by_kind": counts,
            "mean_tokens_per_document": round(tokens / max(documents, 1), 1), "tokens": tokens,
            "max_tokens": corpus.max_tokens,
            "how": f"documents: exact count before validation and dedup; tokens: estimate, the mean of "
                   f"{sum(len(s) for s in sample.values())} generated documents under {tokenizer_words}, "
                   f"capped at max_tokens={corpus.max_tokens}"}


def _count_rows(path: str) -> tuple[int, bool]:
    """(rows, exact) of one local input file."""
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows, True
    header = 1 if lower.endswith((".csv", ".tsv")) else 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(COUNT_LIMIT if size <= COUNT_LIMIT else 2**20)
    lines = sum(1 for line in head.splitlines() if line.strip())
    if size <= COUNT_LIMIT:
        return max(lines - header, 0), True
    return max(round(lines * size / max(len(head), 1)) - header, 0), False


def _inputs_size(corpus, tokenizer: str | None) -> dict:
    files, remote = [], []
    for pattern in corpus.inputs:
        if "://" in pattern:
            remote.append(pattern)
        else:
            files.extend(sorted(glob.glob(pattern)))
    rows, exact = 0, not remote
    for path in files:
        n, ok = _count_rows(path)
        rows, exact = rows + n, exact and ok
    size = sum(os.path.getsize(p) for p in files)
    per_token = 1.0 if tokenizer == "byte" else BYTES_PER_BPE_TOKEN
    tokens = min(round(size / per_token), rows * corpus.max_tokens)
    how = (f"{len(files)} local file(s), {size:,} bytes; documents: {'counted' if exact else 'estimate'}"
           f"{' (CSV rows = lines)' if any(p.lower().endswith(('.csv', '.tsv')) for p in files) else ''}; "
           f"tokens: estimate, file bytes / {per_token:g}, capped at documents x max_tokens")
    if remote:
        how += f"; {len(remote)} remote input(s) not counted: {', '.join(remote)}"
    return {"source": "inputs", "documents": rows, "tokens": tokens, "input_bytes": size,
            "mean_tokens_per_document": round(tokens / max(rows, 1), 1), "max_tokens": corpus.max_tokens,
            "how": how}
