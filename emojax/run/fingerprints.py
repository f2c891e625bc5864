"""Which settings are in each stage's fingerprint: those that can change what the stage writes, and no others.

A stage is skipped when its fingerprint (its output settings plus its inputs' fingerprints) equals the one in
its complete record, and recomputed when it differs. So a setting in OUTPUT_SETTINGS that changes recomputes the
stage and everything after it, and a setting in OTHER_SETTINGS never does: it only changes how the work is
done (memory, parallelism, logging) or is derived by `emojax run` itself (paths: their contents are covered
by the producing stage's fingerprint). tests/test_run_durability.py checks that every field of every stage
config is in exactly one of the two tables, so a new setting cannot be forgotten.
"""

from __future__ import annotations

from emojax.digest import fingerprinted
from emojax.sae.fingerprint import MATH as SAE_MATH

# stage -> the settings that change its outputs (float summation order counts: a chunk size that regroups a
# sum changes the bits, so it is here).
OUTPUT_SETTINGS: dict[str, tuple[str, ...]] = {
    "train": ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "vocab_size", "seq_len", "rope_theta",
              "tie_embeddings", "data", "world", "n_documents", "corpus_seed", "n_stories", "neutral_per_topic",
              "eval_fraction", "batch_size",
              "steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "b2", "seed"),
    "corpus": ("inputs", "reader", "labels_file", "extra_labels", "generator", "tokenizer", "max_chars",
               "max_tokens", "n_shards", "pack_length", "val_fraction", "test_fraction", "split_by"),
    "dump": ("layers", "dtype", "model_dtype", "pool_start", "buckets", "tokens_per_batch", "token_chunk_rows",
             "token_read_rows", "doc_chunk_rows", "doc_read_rows", "tokenizer", "attention",
             "mesh"),  # batch rows are rounded to the mesh's data axis: another mesh batches (and sums) otherwise
    "fit": ("layers", "labels", "method", "fit_split", "eval_splits", "denoise", "denoise_variance",
            "neutral_split", "denoise_on", "unit_norm", "negative", "pca_iters", "probe", "probe_l2", "probe_lr",
            "probe_epochs", "probe_patience", "probe_val_split", "probe_seed", "kmeans_k", "kmeans_seed", "lens_top_k",
            "norm_tokens", "chunk_docs"),
    "sae": SAE_MATH,  # the SAE resume check's own table (emojax/sae/fingerprint.py): one list, two users
    "steer": ("concepts", "strengths", "prompts", "max_new_tokens", "monitor_prompt", "monitor_new_tokens"),
    "experiment": ("suite", "concepts", "strengths", "layers", "ablate", "unit", "positions", "outcomes", "scenarios",
                   "samples", "max_new_tokens", "temperature", "top_p", "seed", "batch_size", "shard_rows",
                   "judge_url", "judge_model"),
    "validate": ("split", "percentile", "threshold_tokens", "examples", "context", "n_boot", "seed", "permutations",
                 "chunk_rows"),  # a readout's matmul may block differently for another row count
}

# stage -> setting -> why it cannot change the stage's outputs.
OTHER_SETTINGS: dict[str, dict[str, str]] = {
    "train": {"out": "where the model is written, not what",
              "checkpoint_every": "resuming is exact, so checkpoint spacing never changes the result"},
    "corpus": {"out": "set by emojax run from run.dir"},
    "dump": {"corpus": "set from run.dir; the corpus is covered by its stage's fingerprint",
             "out": "set from run.dir",
             "model": "set from run.model; the model is covered by the train stage's fingerprint (its content)",
             "writes_in_flight": "how many writes overlap the forward, not what is written",
             "verify": "rereads complete shards and rewrites only corrupted ones, with the same bits"},
    "fit": {"store": "set from run.dir; the store is covered by the dump's fingerprint",
            "out": "set from run.dir",
            "model": "set from run.model; covered by the train stage's fingerprint",
            "mesh": "how the statistics are laid out over devices (sums regroup only within float rounding)"},
    "sae": {"store": "set from run.dir; the store is covered by the dump's fingerprint",
            "out": "set from run.dir",
            "model": "set from run.model; covered by the train stage's fingerprint",
            "bank": "set from run.dir; the bank is covered by the fit's fingerprint",
            "mesh": "how the sweep is laid out over devices",
            "decoder": "dense or gathered decoding compute the same function (the SAE's own resume check still "
                       "refuses to mix them within one training run)",
            "checkpoint_every": "resuming is exact, so checkpoint spacing never changes the result",
            "log_every": "how often metrics are printed"},
    "steer": {},
    "experiment": {"model": "set from run.model; covered by the train stage's fingerprint",
                   "bank": "set from run.dir; the bank is covered by the fit's fingerprint",
                   "out": "set from run.dir",
                   "judge_key_env": "which variable holds the key; the judge's answers are cached by request",
                   "judge_concurrency": "requests in flight; each answer is the same"},
    "validate": {"templates": "the file's content is in the stage's fingerprint (templates_sha256), not its path"},
}


def output_settings(stage: str, config) -> dict:
    """The fingerprinted settings of `config` (a stage's typed config) as plain data."""
    values = fingerprinted(config)
    return {k: values[k] for k in OUTPUT_SETTINGS[stage]}


__all__ = ["OTHER_SETTINGS", "OUTPUT_SETTINGS", "output_settings"]
