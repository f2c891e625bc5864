"""Concept directions: the study's recipe and its alternatives, fitted from the activation store, and the
validations of a fitted bank (top-activating tokens, numeric templates)."""

from emojax.concepts.bank import BankError, BankModelError, ConceptBank, check_model, load_bank
from emojax.concepts.config import FitConfig, ValidateConfig
from emojax.concepts.fit import fit
from emojax.concepts.recipe import FitError
from emojax.concepts.templates import Template, load_templates, template_curves
from emojax.concepts.top_tokens import top_activating_tokens
from emojax.concepts.validate import validate

__all__ = ["BankError", "BankModelError", "ConceptBank", "FitConfig", "FitError", "Template", "ValidateConfig",
           "check_model", "fit", "load_bank", "load_templates", "template_curves", "top_activating_tokens",
           "validate"]
