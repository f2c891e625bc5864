"""Models: one Flax NNX decoder for the Llama family, switched by `ModelConfig` fields.

Axis letters of shape suffixes (x_BTD) and einsum strings: the glossary at the top of emojax/__init__.py.

Logical axis names for sharding (see sharding.py): batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab,
layers, plus act_* for activations.
"""

from emojax.models.config import ModelConfig, RopeConfig
from emojax.models.hf_config import SUPPORTED_ARCHITECTURES, config_from_hf_dict, read_hf_config
from emojax.models.lm import LanguageModel, abstract_model, load_model, random_model
from emojax.models.sharding import make_mesh
from emojax.models.interventions import Interventions, SaeClamp
from emojax.models.transformer import ForwardOutput, KVCache, Transformer

__all__ = [
    "ForwardOutput", "Interventions", "KVCache", "LanguageModel", "ModelConfig", "RopeConfig", "SaeClamp",
    "SUPPORTED_ARCHITECTURES", "Transformer", "abstract_model", "config_from_hf_dict", "load_model", "make_mesh",
    "random_model", "read_hf_config",
]
