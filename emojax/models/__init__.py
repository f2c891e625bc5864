"""Models: one Flax NNX decoder for the Llama family, switched by `ModelConfig` fields.

Axis vocabulary (used in shape-suffixed names such as x_BTD, in einsum strings and in sharding rules):

    B batch     T query positions    S key/value positions    D d_model (embed)
    N q heads   K kv heads           G q heads per kv head    H head_dim
    F mlp       V vocab              L layers (or residual indices, L + 1 of them)

Logical axis names for sharding (see sharding.py): batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab,
layers, plus act_* for activations.
"""

from emojax.models.config import ModelConfig, RopeConfig
from emojax.models.hf_config import SUPPORTED_ARCHITECTURES, config_from_hf_dict, read_hf_config
from emojax.models.lm import LanguageModel, abstract_model, load_model, random_model
from emojax.models.sharding import make_mesh
from emojax.models.transformer import ForwardOutput, Patch, Steering, Transformer

__all__ = [
    "ForwardOutput", "LanguageModel", "ModelConfig", "Patch", "RopeConfig", "Steering", "SUPPORTED_ARCHITECTURES",
    "Transformer", "abstract_model", "config_from_hf_dict", "load_model", "make_mesh", "random_model",
    "read_hf_config",
]
