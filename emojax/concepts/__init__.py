"""Concept directions: the study's recipe and its alternatives, fitted from the activation store."""

from emojax.concepts.bank import BankError, ConceptBank, load_bank
from emojax.concepts.config import FitConfig, load_fit_config
from emojax.concepts.fit import fit
from emojax.concepts.recipe import FitError

__all__ = ["BankError", "ConceptBank", "FitConfig", "FitError", "fit", "load_bank", "load_fit_config"]
