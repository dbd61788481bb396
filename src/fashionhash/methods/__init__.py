"""Hashing methods, registered by name in :data:`METHODS`."""
from fashionhash.methods.base import METHODS, HashingMethod
from fashionhash.methods import adversarial  # noqa: F401  (registers "adversarial")

__all__ = ["METHODS", "HashingMethod"]
