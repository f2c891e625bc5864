"""Settings of the fit stage (one frozen dataclass; YAML `fit:` and key=value overrides change only what differs)."""

from __future__ import annotations

import dataclasses

from emojax.config_loader import config_section, non_negative, positive, ranged

METHODS = ("mean_diff", "contrastive", "pca_pairs", "probe")
NEGATIVES = ("neutral", "rest")
DENOISE_ON = ("tokens", "documents")


@config_section("fit", derived={"model": "model", "store": "input", "out": "output"})
@dataclasses.dataclass(frozen=True)
class FitConfig:
    store: str = "runs/default/activations"  # the dump stage's output (store.json + arrays)
    out: str = "runs/default/bank"  # bank.safetensors, bank.json, eval.json, probes.safetensors
    layers: tuple[int, ...] = non_negative(())  # residual indices to fit; empty: every layer of the store
    labels: tuple[str, ...] = ()  # concepts to fit; empty: every non-neutral label of the store
    method: str = "mean_diff"  # mean_diff (the study) | contrastive | pca_pairs | probe
    fit_split: str = "train"  # documents the vectors are fitted on
    # held-out readouts (a split absent from the store is skipped); the layer is chosen on "val", reported on test
    eval_splits: tuple[str, ...] = ("val", "test", "implicit")
    # -- the study's recipe
    denoise: bool = True  # project the top neutral principal components out of every vector
    # ...the fewest components explaining this fraction of the neutral variance
    denoise_variance: float = ranged(0.5, 0, 1, lo_open=True, hi_open=True)
    neutral_split: str = "train"  # the neutral documents the denoising PCA is fitted on
    # ...on their token rows (tokens; each document's first token, the BOS, left out) or pooled means (documents)
    denoise_on: str = "tokens"
    unit_norm: bool = False  # scale every vector to norm 1
    # -- alternatives
    # contrastive / pca_pairs: the negative set; rest = the other concepts' documents (one-vs-rest, each concept
    # weighted equally); neutral = the neutral dialogues, which add a shared story-vs-dialogue offset to every vector
    negative: str = "rest"
    pca_iters: int = positive(30)  # power iterations (each a pass over the fit split) of pca_pairs
    probe: bool = True  # also train probes for evaluation when method != probe
    probe_l2: float = non_negative(1e-3)  # L2 weight on the probe weights (standardised inputs)
    probe_lr: float = positive(0.05)  # Adam learning rate
    probe_epochs: int = positive(200)  # at most this many passes over the fit split
    probe_patience: int = positive(10)  # stop after this many epochs without a better val loss (early stopping)
    probe_val_split: str = "val"
    probe_seed: int = non_negative(0)
    # -- geometry and evaluation
    kmeans_k: int = positive(10)
    kmeans_seed: int = non_negative(0)
    model: str = ""  # checkpoint or preset for the logit lens; empty: no logit lens
    lens_top_k: int = positive(10)  # top and bottom tokens listed per vector
    # token rows, sampled uniformly from the whole store (BOS left out), averaged for the mean residual norm (the
    # steering unit); 0: the fit split's pooled rows
    norm_tokens: int = non_negative(65536)
    # -- streaming and sharding
    chunk_docs: int = positive(4096)  # pooled or token rows per read (the most activations held in memory at once)
    mesh: tuple[int, ...] = positive(())  # (data, fsdp, tensor); empty: every device on data

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {NEGATIVES}, got {self.negative!r}")
        if self.denoise_on not in DENOISE_ON:
            raise ValueError(f"denoise_on must be one of {DENOISE_ON}, got {self.denoise_on!r}")
        if not 0.0 < self.denoise_variance < 1.0:
            raise ValueError(f"denoise_variance must be in (0, 1), got {self.denoise_variance}")
        for name in ("chunk_docs", "probe_epochs", "probe_patience", "pca_iters", "kmeans_k", "lens_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.probe_l2 < 0 or self.probe_lr <= 0:
            raise ValueError("probe_l2 must be >= 0 and probe_lr > 0")
        if self.mesh and len(self.mesh) != 3:
            raise ValueError(f"mesh must have 3 entries (data, fsdp, tensor), got {list(self.mesh)}")


@config_section("validate")
@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """The validate stage: top-activating tokens on held-out text and numeric templates (emojax.concepts.validate).
    It reads the run's store, bank and model; the layer is the run's (run.layer, else the fit's best layer)."""

    split: str = "test"  # the held-out documents whose tokens are read (every label, neutral included)
    percentile: float = ranged(90.0, 0, 100, lo_open=True, hi_open=True)  # a token is "top" above this percentile
    # tokens (seeded uniform sample of the split, BOS left out) each concept's percentile is computed on; a split
    # with no more tokens than this gets the exact percentile over all of them
    threshold_tokens: int = positive(100_000)
    examples: int = non_negative(5)  # top tokens listed per concept, each with its context
    context: int = non_negative(6)  # tokens of context shown either side of an example
    n_boot: int = non_negative(1000)  # bootstrap resamples of the split's documents for the lift intervals
    seed: int = non_negative(0)  # the threshold sample and the bootstrap
    templates: str = ""  # a numeric-templates YAML file; empty: the built-in templates (emojax/concepts/data)
    permutations: int = positive(10_000)  # random permutations for a template's Spearman p-value (exact up to 8 values)
    chunk_rows: int = positive(16384)  # token rows per read (the most activations held in memory at once)

    def __post_init__(self):
        if not 0.0 < self.percentile < 100.0:
            raise ValueError(f"percentile must be in (0, 100), got {self.percentile}")
        for name in ("threshold_tokens", "permutations", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
