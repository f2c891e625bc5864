"""What a resumed SAE run must share with the checkpoint it resumes: every setting that changes the math.

Every SaeConfig field is classified in one of three tables below (tests/test_sae_durability.py walks
dataclasses.fields, so a new field cannot be forgotten):

- MATH: compared as set; another value trains another SAE, so the checkpoint is not resumed;
- RESOLVED: compared by what it resolves to on this run's devices (decoder "auto" gathers on CPU with tensor 1
  and multiplies densely elsewhere, so one config can mean two decoders);
- NOT_MATH: cannot change the trained weights, with the reason.

The data is compared by content, never by path: `data` is the source's identity (for a store, its store.json
fingerprints: model, tokenizer, corpus, capture settings), so a moved store resumes and a re-dumped one does not.
"""

from __future__ import annotations

from emojax.sae.config import SaeConfig

MATH = ("variant", "n_latents", "k", "sparsity_coeff", "sparsity_warmup_steps", "aux_k", "aux_coeff",
        "dead_window_frac", "dead_after_tokens", "jump_bandwidth", "jump_init_threshold", "threshold_decay", "lr",
        "lr_warmup_steps", "lr_decay_frac", "adam_b1", "adam_b2", "batch_size", "steps", "seed", "sweep",
        "sweep_values", "init_sample_tokens", "buffer_chunks", "layer")
RESOLVED = {
    "decoder": "compared as resolved on this run's devices ('gather' or 'dense'): 'auto' differs by platform",
}
NOT_MATH = {
    "mesh": "the data x tensor layout: the same SAE up to float rounding (sum order), and a checkpoint restores "
            "onto any mesh; the decoder a tensor size implies is compared through `decoder`",
    "checkpoint_every": "when the state is saved; a resume from any committed step is exact",
    "log_every": "what is printed and kept in the history",
    "store": "a path: the store's content identity (`data`) is compared instead",
    "out": "a path: where checkpoints and exports go",
    "model": "the model of the spliced-in loss, measured after training",
    "bank": "the concept bank matched to the latents after training",
}


def resolved_decoder(variant) -> str:
    """The decoder the trainer's variant really uses: 'gather' (the K selected rows) or 'dense'."""
    return "gather" if getattr(variant, "gather_decode", False) else "dense"


def fingerprint(config: SaeConfig, d_model: int, variant, data: str) -> dict:
    """The JSON record a checkpoint keeps of the settings that fix the math (tuples as lists, as JSON reads back)."""
    values = {name: getattr(config, name) for name in MATH}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return {**values, "decoder": resolved_decoder(variant), "d_model": int(d_model), "data": data}


def differences(saved: dict, now: dict) -> list[str]:
    """One phrase per setting that differs, naming it with both values (for the refusal message)."""
    out = []
    for key, value in now.items():
        old = saved.get(key)
        if old == value:
            continue
        if key == "data":
            out.append(f"data (the training data's content identity differs: checkpoint {str(old)[:12]}, now "
                       f"{str(value)[:12]}; a moved store resumes, another or re-dumped one does not)")
        else:
            out.append(f"{key} (checkpoint {old!r}, now {value!r})")
    return out


__all__ = ["MATH", "NOT_MATH", "RESOLVED", "differences", "fingerprint", "resolved_decoder"]
