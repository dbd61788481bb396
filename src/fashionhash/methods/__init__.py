"""Hashing methods, registered by name in :data:`METHODS`."""
from fashionhash.methods.base import METHODS, HashingMethod
from fashionhash.methods import adversarial  # noqa: F401  (registers "adversarial")
from fashionhash.methods import csq, dch, dlbhc, dpsh, dsh, hashnet, itq, lsh, sgml  # noqa: F401,E402  (register the peers)

__all__ = ["METHODS", "HashingMethod"]
