"""A valid activation store written straight from arrays (no model, no corpus): for the fit and SAE tests.

    write_synthetic_store(tmp / "store", pooled={4: acts_ND}, label_id=labels_N, split=splits_N,
                          label_ids={"joy": 0, "fear": 1})

Documents are stored in the given order as one shard; rows past the last document are gap rows, as the dump
stage leaves them. `tokens` (optional) holds per-layer token activations [N, T, D] (T tokens per document);
without it every document has zero token rows.
"""

from __future__ import annotations

import numpy as np

from emojax.store.state import SPLIT_CODES, STORE_FORMAT, KeyValueFolder
from emojax.store.writer import array_specs, create_arrays


def write_synthetic_store(path, pooled: dict[int, np.ndarray], label_id, split,
                          tokens: dict[int, np.ndarray] | None = None, label_ids: dict[str, int] | None = None,
                          doc_chunk_rows: int = 256, doc_read_rows: int = 64, token_chunk_rows: int = 1024,
                          token_read_rows: int = 256, dtype: str = "float32", complete: bool = True) -> str:
    """Writes a store at `path`; `split` holds names ("train", ...) or SPLIT_CODES; neutral label id is -1."""
    path = str(path)
    layers = tuple(sorted(int(k) for k in pooled))
    first = np.asarray(pooled[layers[0]])
    n, d_model = first.shape
    label_id = np.asarray(label_id, np.int32)
    split = np.asarray([SPLIT_CODES[s] if isinstance(s, str) else int(s) for s in split], np.int8)
    if label_ids is None:
        label_ids = {f"label_{i}": int(i) for i in sorted(set(label_id.tolist()) - {-1})}
    assert label_id.shape == (n,) and split.shape == (n,), "one label and split per document"
    t_per_doc = 0
    if tokens:
        assert set(tokens) == set(layers), "token activations for every pooled layer"
        t_per_doc = int(np.asarray(tokens[layers[0]]).shape[1])
    n_doc_rows = max(-(-n // doc_chunk_rows) * doc_chunk_rows, doc_chunk_rows)
    n_tok = n * t_per_doc
    n_token_rows = max(-(-n_tok // token_chunk_rows) * token_chunk_rows, token_chunk_rows)
    specs = array_specs(n_token_rows, n_doc_rows, d_model, layers, dtype, (token_chunk_rows, token_read_rows),
                        (doc_chunk_rows, doc_read_rows))
    arrays = create_arrays(path, specs)

    def padded(values, fill, dt, shape):
        out = np.full(shape, fill, dt)
        out[:len(values)] = values
        return out

    docs = {
        "doc_token_start": padded(np.arange(n) * t_per_doc, -1, np.int64, (n_doc_rows,)),
        "doc_n_tokens": padded(np.full(n, t_per_doc), 0, np.int32, (n_doc_rows,)),
        "doc_n_pooled": padded(np.full(n, t_per_doc), 0, np.int32, (n_doc_rows,)),
        "doc_label_id": padded(label_id, -2, np.int32, (n_doc_rows,)),
        "doc_split": padded(split, -1, np.int8, (n_doc_rows,)),
        "doc_shard_row": padded(np.arange(n), -1, np.int32, (n_doc_rows,)),
    }
    for name, values in docs.items():
        arrays[name].write(values).result()
    arrays["token_ids"].write(padded(np.zeros(n_tok, np.int32), -1, np.int32, (n_token_rows,))).result()
    for layer in layers:
        acts = np.asarray(pooled[layer], np.float32)
        assert acts.shape == (n, d_model), f"pooled[{layer}] must be [{n}, {d_model}]"
        arrays[f"layer_{layer:02d}/pooled"].write(padded(acts, 0, np.float32, (n_doc_rows, d_model))).result()
        tok = np.zeros((n_token_rows, d_model), arrays[f"layer_{layer:02d}/tokens"].dtype.numpy_dtype)
        if tokens:
            tok[:n_tok] = np.asarray(tokens[layer]).reshape(n_tok, d_model)
        arrays[f"layer_{layer:02d}/tokens"].write(tok).result()
    shard = {"index": 0, "name": "synthetic-00000", "n_docs": n, "n_tokens": n_tok, "doc_start": 0,
             "token_start": 0}
    folder = KeyValueFolder(path)
    folder.write_json("shards/synthetic-00000.json", {"doc_ids": [f"doc-{i}" for i in range(n)], "short_docs": 0})
    folder.write_json("store.json", {
        "format": STORE_FORMAT, "fingerprints": {}, "layers": list(layers), "d_model": int(d_model),
        "dtype": dtype, "pool_start": 0, "model": "synthetic", "corpus": "synthetic",
        "label_ids": dict(label_ids), "split_codes": SPLIT_CODES, "n_doc_rows": n_doc_rows,
        "n_token_rows": n_token_rows, "n_docs": n, "n_tokens": n_tok, "shards": [shard],
        "complete_shards": ["synthetic-00000"] if complete else [], "complete": complete,
    })
    return path
