"""emojax: find, measure, steer and monitor concept directions inside language models, in JAX.

Layers. A module imports only from its own layer or the ones below it, never upward and never in a cycle
(tests/test_layering.py parses every import, those inside functions included):

    errors
    digest, fileio, locks, progress, config_loader, plotting    (utilities)
    tokenizer
    models                                             (the decoder, interventions, loading, sharding)
    corpus                                             (catalogue, generator, readers, corpus configs)
    world                                              (the built-in emotion world: situations, stories, choices)
    pipelines                                          (the Beam pipelines: the corpus's with its driver, screening's)
    train                                              (the built-in model; registers itself with models)
    store                                              (the activation dump and store)
    concepts                                           (statistics, fit, bank, evaluation, layer choice)
    sae
    steer                                              (decode loop, readouts, steering harness)
    experiment                                         (behavioural experiments: suites, conditions, rates)
    screen                                             (data screening: concept scores of prompt/response samples)
    serve                                              (the HTTP server: engine, app, alerts)
    report
    run                                                (orchestration of the stages)
    cli, and every package's `commands` module         (argument parsing only)
    emojax (this facade)
kernels/ imports nothing from emojax.

Axis letters. Shape suffixes (x_BTD), einsum strings and sharding rules use one meaning per letter:

    B batch (rows; tokens of an SAE batch)      T query / token positions     S key/value positions (cache columns)
    P prompt columns (decode)                  D d_model                     V vocabulary
    L layers (L + 1 residual indices)          N query heads                 K key/value heads
    G query heads per key/value head           H head dim                    R rotary dims
    I MLP hidden (intermediate)                F SAE latents (features)      J selected latent slots (TopK)
    M clamped SAE latents                      C concepts                    X examples a statistic runs over
    E steering vectors (Interventions)         A ablated directions          Z stop-token slots
    Q principal components (PCA axes)          W SAEs of a sweep, trained together
"""

from emojax.errors import CheckpointError, ConfigError, EmojaxError
from emojax.models import (
    ForwardOutput,
    Interventions,
    LanguageModel,
    ModelConfig,
    abstract_model,
    load_model,
    make_mesh,
    random_model,
)
from emojax.tokenizer import Tokenizer
from emojax import train  # noqa: F401  (registers the built-in model's trainer with emojax.models)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "EmojaxError", "ForwardOutput", "Interventions", "LanguageModel", "ModelConfig",
    "Tokenizer", "abstract_model", "load_model", "make_mesh", "random_model",
]
