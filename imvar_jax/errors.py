"""Errors shared by every layer; the bottom of the import graph (it imports nothing of imvar_jax)."""


class ConfigError(ValueError):
    """A config key or value this implementation does not support, named by key."""
