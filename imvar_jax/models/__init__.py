"""The Flax models; ``abstract_params`` gives any of their params trees as shapes."""

from imvar_jax.models.abstract import abstract_params

__all__ = ["abstract_params"]
