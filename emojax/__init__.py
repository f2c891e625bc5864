"""emojax: find, measure, steer and monitor concept directions inside language models, in JAX."""

from emojax.errors import CheckpointError, ConfigError, EmojaxError
from emojax.models import (
    ForwardOutput,
    LanguageModel,
    ModelConfig,
    Patch,
    Steering,
    abstract_model,
    load_model,
    make_mesh,
    random_model,
)
from emojax.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "EmojaxError", "ForwardOutput", "LanguageModel", "ModelConfig", "Patch",
    "Steering", "Tokenizer", "abstract_model", "load_model", "make_mesh", "random_model",
]
