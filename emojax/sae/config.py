"""SaeConfig: every setting of one SAE training run (the `sae:` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass

from emojax.config_loader import config_section, fraction, non_negative, positive, ranged
from emojax.errors import ConfigError

VARIANTS = ("relu_l1", "topk", "batchtopk", "jumprelu")
SWEEPABLE = ("k", "sparsity_coeff")
# The sparsity coefficient each variant trains with when sae.sparsity_coeff is not set. The trainer scales inputs so
# a token's mean squared norm is 1 and sums the squared error over the residual dimensions, so the loss of a token is
# its fraction of unexplained variance plus coeff x penalty, whatever d_model is: for relu_l1 a latent must cut the
# squared error by coeff x its (row-norm weighted) activation, for jumprelu each active latent must explain at least
# coeff of the token's variance. Both values recover a planted dictionary (tests/test_sae.py: 256 atoms, 4 per
# token) at L0 3-13; topk and batchtopk have no penalty.
DEFAULT_SPARSITY = {"relu_l1": 0.15, "jumprelu": 0.02, "topk": 0.0, "batchtopk": 0.0}
DECODERS = ("auto", "dense", "gather")


@config_section("sae", derived={"store": "input", "out": "output", "model": "model", "bank": "bank"})
@dataclass(frozen=True)
class SaeConfig:
    variant: str = "topk"
    n_latents: int = positive(4096)
    k: int = positive(32)  # active latents per token (topk, batchtopk: mean per token)
    sparsity_coeff: float | None = non_negative(None)  # L1 (relu_l1) or L0 (jumprelu); None: DEFAULT_SPARSITY
    sparsity_warmup_steps: int = non_negative(0)  # the coefficient ramps linearly from 0 over these steps
    aux_k: int = positive(256)  # latents in the AuxK reconstruction of the residual from dead latents (topk, batchtopk)
    aux_coeff: float = non_negative(1 / 32)
    dead_window_frac: float = fraction(0.05)  # a latent silent this share of the run's tokens is dead ...
    dead_after_tokens: int = positive(100_000)  # ... or this many tokens if more (see dead_window_tokens)
    # jumprelu thresholds, in the units of the scaled inputs (a token's norm is about 1, so a latent's activation is
    # about 1/sqrt(L0)): they start at jump_init_threshold (stored as its log) and learn through a straight-through
    # kernel jump_bandwidth wide. SAELens's 0.001 for both is for inputs of norm sqrt(d_model) and billions of tokens;
    # at this scale the thresholds then never leave zero in a run of millions, and the L0 penalty has no effect.
    jump_bandwidth: float = positive(0.05)
    jump_init_threshold: float = positive(0.1)
    threshold_decay: float = fraction(0.99)  # EMA decay of the batchtopk inference threshold
    lr: float = positive(2e-4)
    lr_warmup_steps: int = non_negative(100)
    lr_decay_frac: float = fraction(0.2)  # linear decay to zero over the last fraction of the steps
    adam_b1: float = ranged(0.9, 0, 1, hi_open=True)
    adam_b2: float = ranged(0.999, 0, 1, hi_open=True)
    batch_size: int = positive(4096)
    steps: int = positive(10_000)
    seed: int = non_negative(0)
    sweep: str = ""  # "k" or "sparsity_coeff": trains len(sweep_values) SAEs in one pass over the data
    sweep_values: tuple[float, ...] = non_negative(())  # k values (>= 1, whole) or coefficients
    mesh: tuple[int, ...] = positive((1, 1))  # (data, tensor): batch over "data", latents over "tensor"
    # TopK training's decoder: "gather" reads the K selected decoder rows per token (exactly k, ties to the lower
    # index), "dense" multiplies the [B, F] code (a threshold top-k); "auto" gathers on CPU with tensor 1 (1.2x
    # faster a step there) and stays dense elsewhere. The two agree up to float rounding.
    decoder: str = "auto"
    checkpoint_every: int = non_negative(1000)  # steps; 0 = never
    log_every: int = positive(100)
    init_sample_tokens: int = positive(16384)  # tokens for the input scale and the decoder-bias geometric median
    buffer_chunks: int = positive(64)
    layer: int = non_negative(1)  # residual index in the store
    store: str = ""
    out: str = ""
    model: str = ""  # checkpoint or preset the store was dumped with, for the spliced-in LM loss; empty: none
    bank: str = ""  # concept bank folder whose vectors the latents are matched to; empty or no bank there: none

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"sae.variant={self.variant!r} is not one of {list(VARIANTS)}")
        if self.sparsity_coeff is None:  # resolved here, so a fingerprint records the value trained with
            object.__setattr__(self, "sparsity_coeff", DEFAULT_SPARSITY[self.variant])
        if self.sweep and self.sweep not in SWEEPABLE:
            raise ConfigError(f"sae.sweep={self.sweep!r}: only {list(SWEEPABLE)} can be swept")
        if self.sweep and not self.sweep_values:
            raise ConfigError(f"sae.sweep={self.sweep!r} needs sae.sweep_values")
        if self.decoder not in DECODERS:
            raise ConfigError(f"sae.decoder={self.decoder!r} is not one of {list(DECODERS)}")
        if self.decoder == "gather" and (self.variant != "topk" or self.mesh[1] != 1):
            raise ConfigError(f"sae.decoder='gather' needs variant topk and mesh tensor=1 (the decoder rows are "
                              f"gathered whole), got variant={self.variant!r}, mesh={list(self.mesh)}")
        if len(self.mesh) != 2 or min(self.mesh) < 1:
            raise ConfigError(f"sae.mesh={list(self.mesh)} must be two positive sizes [data, tensor]")
        if self.batch_size % self.mesh[0]:
            raise ConfigError(f"sae.batch_size={self.batch_size} is not divisible by mesh data={self.mesh[0]}")
        if self.n_latents % self.mesh[1]:
            raise ConfigError(f"sae.n_latents={self.n_latents} is not divisible by mesh tensor={self.mesh[1]}")
        if self.variant in ("topk", "batchtopk") and not 0 < self.k_max <= self.n_latents // self.mesh[1]:
            raise ConfigError(f"sae.k={self.k_max} must be in 1..n_latents/tensor={self.n_latents // self.mesh[1]}")

    @property
    def n_sae(self) -> int:
        return len(self.sweep_values) if self.sweep else 1

    def values(self, name: str) -> tuple[float, ...]:
        """The per-SAE values of a sweepable setting (length n_sae)."""
        return tuple(self.sweep_values) if self.sweep == name else (getattr(self, name),) * self.n_sae

    @property
    def dead_window_tokens(self) -> int:
        """Tokens a latent must stay silent to count as dead (and join AuxK): dead_window_frac of the run's tokens,
        at least dead_after_tokens, at most the whole run (in a run shorter than the floor, latents that never
        fired are the dead ones)."""
        run = self.steps * self.batch_size
        return min(max(int(self.dead_window_frac * run), self.dead_after_tokens), run)

    @property
    def k_max(self) -> int:
        return int(max(self.values("k")))
