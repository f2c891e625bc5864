"""What has a model trained on the built-in world learned? Three probes, each against its chance level.

    python scripts/world_diagnostics.py MODEL_DIR [--n 400]

- copy: at the second mention of the companion's name in a held-out story (val situations), the probability the
  model gives that name's first token. A model that reads its context puts most of its mass there; one that does
  not gives it about the name table's frequency.
- naming: in the model's own training documents that name the emotion (stories and vignettes after their cues or
  situation, dialogue replies), and in documents of the same kinds on held-out situations, the rank of the true
  name among the world's names' first tokens at the name's position, by document kind (chance with all 171:
  top-5 2.9%).
- naming after implicit scenarios: after '<implicit scenario> You must feel', the same rank (what the demo's
  implicit split asks of the representation).
- reach: how far back the model reads. Each token of a held-out document is replaced in turn by a random one, and
  the KL divergence of the next-token distribution at the document's end is averaged by distance. A model that
  infers an emotion from a situation 60 tokens back must be moved by tokens that far away.

The world's settings come from the model folder's train.json, so training documents are the model's own.
Figures are means with a 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import emojax
from emojax.experiment.stats import wilson
from emojax.tokenizer import left_pad
from emojax.world import World, WorldConfig

COMPANION = re.compile(r"with (?:her|his|their|my) (?:old |long-time |beloved )?(?:friend|rival|partner|boss|child)"
                       r",? ([A-Z][a-z]+)")


def last_logits(lm, rows: list[list[int]], batch: int = 32) -> np.ndarray:
    out = []
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        tokens, mask = left_pad(part, max(map(len, part)))
        out.append(np.asarray(lm(tokens, mask).logits)[:, -1])
    return np.concatenate(out)


def rate(hits: np.ndarray) -> str:
    lo, hi = wilson(int(hits.sum()), len(hits))
    return f"{hits.mean():.3f} [{lo:.3f}, {hi:.3f}] (n={len(hits)})"


def copy_probe(lm, world: World, n: int) -> None:
    tok = lm.tokenizer
    rows, targets = [], []
    for i in range(50 * n):
        d = world.training_document(10_000_000 + i, "val")
        m = COMPANION.search(d.text)
        later = d.text.find(" " + m.group(1), m.end()) if m else -1
        if later < 0:
            continue
        rows.append(tok.encode(d.text[:later], add_special_tokens=True))
        targets.append(tok.encode(" " + m.group(1), add_special_tokens=False)[0])
        if len(rows) == n:
            break
    probs = np.asarray(jax.nn.softmax(last_logits(lm, rows), axis=-1))
    t = np.asarray(targets)
    p = probs[np.arange(len(t)), t]
    print(f"copy: P(companion's name) at its later mention: mean {p.mean():.3f}; "
          f"argmax is the name {rate(probs.argmax(-1) == t)}")


def naming(lm, rows: list[list[int]], labels: np.ndarray, first: list[int], what: str) -> None:
    scores = last_logits(lm, rows)[:, first]
    rank = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(1)
    C = len(first)
    print(f"naming {what}: top-1 {rate(rank < 1)}, top-5 {rate(rank < 5)}, median rank {np.median(rank):.0f} "
          f"of {C} (chance top-1 {1 / C:.3f}, top-5 {min(5, C) / C:.3f})")


def reach(lm, world: World, n_docs: int = 4, length: int = 140) -> None:
    tok = lm.tokenizer
    rng = np.random.default_rng(0)
    by_distance: dict[int, list[float]] = {}
    docs = [tok.encode(d.text, add_special_tokens=True)[:length] for d in world.heldout_documents(4 * n_docs, "val")]
    for ids in [d for d in docs if len(d) == length][:n_docs]:
        rows = np.tile(np.asarray(ids, np.int32), (length - 1, 1))
        rows[np.arange(length - 1), np.arange(1, length)] = rng.integers(10, tok.vocab_size, length - 1)
        base = jax.nn.log_softmax(lm(np.asarray([ids])).logits[0, -1])
        out = jax.nn.log_softmax(lm(rows).logits[:, -1], axis=-1)
        kl = np.asarray((jnp.exp(base) * (base - out)).sum(-1))  # row j perturbed token j + 1
        for j, value in enumerate(kl):
            by_distance.setdefault(min((length - 2 - j) // 16, 7), []).append(float(value))
    if not by_distance:
        print(f"reach: no held-out document of {length} tokens or more")
        return
    print("reach: mean KL at the last token when one token this far back is replaced: " + ", ".join(
        f"{16 * k}-{16 * k + 15}{'+' if k == 7 else ''}: {np.mean(v):.1e}" for k, v in sorted(by_distance.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    world = World(WorldConfig.from_json(json.loads((Path(args.model) / "train.json").read_text())["config"]["world"]))
    lm = emojax.load_model(args.model, dtype="float32")
    tok = lm.tokenizer
    names = [c.name for c in world.concepts]
    first = [tok.encode(" " + name, add_special_tokens=False)[0] for name in names]

    reach(lm, world)
    copy_probe(lm, world, args.n)

    for split in ("train", "val"):  # the model's own training documents, then the same kinds on held-out situations
        groups: dict[str, tuple[list, list]] = {}
        for i in range(50 * args.n):
            d = world.training_document(i, split)
            m = re.search(r"\b" + re.escape(d.label) + r"\b", d.text) if d.named else None
            rows, labels = groups.setdefault(d.source.split("/")[1], ([], []))
            if m and len(rows) < args.n:
                rows.append(tok.encode(d.text[:m.start()].rstrip(), add_special_tokens=True))
                labels.append(names.index(d.label))
            if i >= 1000 and all(len(r) == args.n for r, _ in groups.values() if r):
                break  # every kind that names has its n (after enough documents to have met every kind)
        for kind, (rows, labels) in sorted(groups.items()):
            if rows:
                where = "its training" if split == "train" else "held-out (val situation)"
                naming(lm, rows, np.asarray(labels), first, f"in {where} {kind} documents")

    per = max(5, 855 // len(names))  # as many scenarios as the full world's 171 x 5
    implicit = [x for e in range(len(names)) for k in range(per) if (x := world.implicit_scenario(e, k)) is not None]
    rows = [tok.encode(x.text + " You must feel", add_special_tokens=True) for x in implicit]
    naming(lm, rows, np.asarray([names.index(x.label) for x in implicit]), first, "after implicit scenarios")


if __name__ == "__main__":
    main()
