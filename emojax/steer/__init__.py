"""Steering and monitoring: the compiled decode loop, interventions as arrays, concept readouts and alerts,
and the steering evaluation harness. The `steer` and `monitor` subcommands live in emojax.steer.commands."""

from emojax.models.interventions import Interventions
from emojax.steer.decode import DecodeConfig, Decoder, Generation
from emojax.steer.evaluate import SteeringEval, congruent_tokens, evaluate_steering, sequence_perplexity
from emojax.steer.interventions import bank_direction, from_bank
from emojax.steer.monitor import Alert, AlertTracker, Readout, Rule, find_alerts, readout_from_bank
from emojax.steer.sampling import Sampling, choose
from emojax.steer.text import encode_prompts, tokenizer_for

__all__ = [
    "Alert", "AlertTracker", "DecodeConfig", "Decoder", "Generation", "Interventions",
    "Readout", "Rule", "Sampling", "SteeringEval",
    "bank_direction", "choose", "congruent_tokens", "encode_prompts",
    "evaluate_steering", "find_alerts", "from_bank", "readout_from_bank", "sequence_perplexity",
    "tokenizer_for",
]
