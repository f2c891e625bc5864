"""SAE variants behind one interface (`Variant`): relu_l1, topk, batchtopk, jumprelu."""

from emojax.sae.variants.base import Encoded, Variant, decode, pre_acts, top_k
from emojax.sae.variants.batchtopk import BatchTopK
from emojax.sae.variants.jumprelu import JumpRelu
from emojax.sae.variants.relu_l1 import ReluL1
from emojax.sae.variants.topk import TopK


def make_variant(config, groups: int = 1, platform: str = "cpu") -> Variant:
    """The variant a SaeConfig names, with its static settings; groups = latent shards ("tensor" size), platform
    the devices' (config.decoder "auto" gathers the selected decoder rows on CPU, where that is faster)."""
    if config.variant == "relu_l1":
        return ReluL1()
    if config.variant == "topk":
        gather = groups == 1 and (config.decoder == "gather" or (config.decoder == "auto" and platform == "cpu"))
        return TopK(k_max=config.k_max, aux_k=config.aux_k, aux_coeff=config.aux_coeff, groups=groups,
                    gather_decode=gather)
    if config.variant == "batchtopk":
        return BatchTopK(k_max=config.k_max, aux_k=config.aux_k, aux_coeff=config.aux_coeff,
                         threshold_decay=config.threshold_decay, groups=groups)
    return JumpRelu(bandwidth=config.jump_bandwidth, init_threshold=config.jump_init_threshold)


__all__ = ["BatchTopK", "Encoded", "JumpRelu", "ReluL1", "TopK", "Variant", "decode", "make_variant",
           "pre_acts", "top_k"]
