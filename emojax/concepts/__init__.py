"""Concept directions: the study's recipe and its alternatives, fitted from the activation store."""

from emojax.concepts.bank import BankError, BankModelError, ConceptBank, check_model, load_bank
from emojax.concepts.config import FitConfig
from emojax.concepts.fit import fit
from emojax.concepts.recipe import FitError

__all__ = ["BankError", "BankModelError", "ConceptBank", "FitConfig", "FitError", "check_model", "fit", "load_bank"]
