"""SAELens-style export: a folder with cfg.json and sae_weights.safetensors that SAELens (and other tools) load.

Weights are written in raw activation units: the training input scale c is folded in (W_enc' = c W_enc,
b_dec' = b_dec / c, W_dec' = W_dec / c), so the exported SAE needs no normalisation (normalize_activations
"none"). Layout: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], plus threshold [F] for jumprelu and
batchtopk (whose inference rule is a JumpReLU with one shared threshold). cfg.json keeps emojax's own fields
under "emojax" so `load_sae` restores the exact variant.

Both files are written atomically (emojax.fileio), weights first. The pair is tied by the weights' sha256, kept in
the safetensors metadata and in cfg.json: a crash between the two renames leaves a pair that `load_sae` refuses
by name, never one that loads silently mixed. Non-finite weights are never exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from emojax.digest import arrays_digest
from emojax.errors import CheckpointError
from emojax.fileio import atomic_path, write_json
from emojax.sae.model import Sae
from emojax.sae.variants import BatchTopK, JumpRelu, ReluL1, TopK

ARCHITECTURE = {"relu_l1": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"


def export_sae(sae: Sae, out_dir: str | Path, hook_layer: int = 0, model_name: str = "",
               extra: dict | None = None) -> Path:
    """Writes `sae` to out_dir (cfg.json + sae_weights.safetensors); returns the folder."""
    out = Path(out_dir)  # created by the first atomic write, after the weights are checked
    c = float(sae.input_scale)
    p = {k: np.asarray(v, np.float32) for k, v in sae.params.items()}
    weights = {"W_enc": p["W_enc"] * c, "b_enc": p["b_enc"], "W_dec": p["W_dec"] / c, "b_dec": p["b_dec"] / c}
    name = sae.variant.name
    if name == "jumprelu":
        weights["threshold"] = np.exp(p["log_threshold"]).astype(np.float32)
    elif name == "batchtopk":
        weights["threshold"] = np.full((sae.n_latents,), float(sae.stats["threshold"]), np.float32)
    weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    bad = [k for k, v in weights.items() if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{out}: refusing to export an SAE with NaN/inf in {', '.join(bad)} (input scale "
                              f"{c}); the training run diverged: retrain it")
    digest = arrays_digest(weights)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"emojax_weights_sha256": digest})
    cfg = {"architecture": ARCHITECTURE[name], "d_in": sae.d_model, "d_sae": sae.n_latents, "dtype": "float32",
           "device": "cpu", "model_name": model_name, "hook_name": f"blocks.{max(hook_layer - 1, 0)}.hook_resid_post",
           "hook_layer": max(hook_layer - 1, 0), "hook_head_index": None, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "finetuning_scaling_factor": False, "context_size": None,
           "prepend_bos": True, "dataset_path": "", "sae_lens_training_version": None,
           "emojax": {"variant": name, "k": int(sae.k), "input_scale_folded": c, "residual_index": hook_layer,
                      "weights_sha256": digest, **(extra or {})}}
    if name == "topk":
        cfg["activation_fn_kwargs"] = {"k": int(sae.k)}
        cfg["k"] = int(sae.k)
    write_json(out / CONFIG, cfg, indent=2)
    return out


def load_sae(path: str | Path) -> Sae:
    """Loads an exported folder back (input scale 1: the scale is folded into the weights)."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text())
        w = load_file(str(path / WEIGHTS))
        with safe_open(str(path / WEIGHTS), "np") as f:
            stamped = (f.metadata() or {}).get("emojax_weights_sha256")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not an exported SAE ({e})") from None
    own = cfg.get("emojax", {})
    if own.get("weights_sha256") and own["weights_sha256"] != stamped:
        raise CheckpointError(f"{path}: {CONFIG} and {WEIGHTS} come from different exports (an export was "
                              "interrupted between its two files); export the SAE again")
    variant = own.get("variant") or {"standard": "relu_l1", "topk": "topk", "jumprelu": "jumprelu"}.get(
        cfg.get("architecture"))
    if variant is None:
        raise CheckpointError(f"{path}/{CONFIG}: architecture {cfg.get('architecture')!r} is not supported")
    params = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    stats = {}
    k = int(own.get("k") or cfg.get("k") or 0)
    if variant == "relu_l1":
        v = ReluL1()
    elif variant == "topk":
        v = TopK(k_max=k)
    elif variant == "batchtopk":
        v = BatchTopK(k_max=k)
        stats = {"threshold": np.float32(w["threshold"][0])}
    else:
        v = JumpRelu()
        params["log_threshold"] = np.log(w["threshold"])
    return Sae(v, params, stats, 1.0, k)
