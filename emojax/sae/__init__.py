"""Sparse dictionaries: SAE variants, a sharded trainer with exact resume, metrics and SAELens-style export."""

from emojax.sae.config import SaeConfig
from emojax.sae.data import ArraySource, BatchSource, StoreSource
from emojax.sae.export import export_sae, load_sae
from emojax.sae.metrics import (bank_max_cosine, dead_fraction, evaluate_batches, heldout_tokens,
                                reconstruction_metrics, spliced_metrics)
from emojax.sae.model import Sae
from emojax.sae.train import NonFiniteBatchError, NonFiniteParamsError, SaeTrainer, TrainResult, train_sae
from emojax.sae.variants import BatchTopK, JumpRelu, ReluL1, TopK, Variant, make_variant

__all__ = ["ArraySource", "BatchSource", "BatchTopK", "JumpRelu", "NonFiniteBatchError", "NonFiniteParamsError",
           "ReluL1", "Sae", "SaeConfig", "SaeTrainer", "StoreSource", "TopK", "TrainResult", "Variant",
           "bank_max_cosine", "dead_fraction", "evaluate_batches", "export_sae", "heldout_tokens", "load_sae",
           "make_variant", "reconstruction_metrics", "spliced_metrics", "train_sae"]
