"""Concept directions: the study's recipe and its alternatives, fitted from the activation store."""

from emojax.concepts.bank import BankError, ConceptBank, load_bank

__all__ = ["BankError", "ConceptBank", "load_bank"]
