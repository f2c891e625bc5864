"""Behavioural experiments: the study's causal results (blackmail, reward hacking, sycophancy, preferences) as a
resumable batch job over conditions x scenarios x samples (`emojax experiment`, the run's experiment stage)."""

from emojax.experiment.config import ExperimentConfig
from emojax.experiment.runner import Condition, Experiment, run_experiment
from emojax.experiment.suite import Suite, builtin_suites, load_suite

__all__ = ["Condition", "Experiment", "ExperimentConfig", "Suite", "builtin_suites", "load_suite", "run_experiment"]
