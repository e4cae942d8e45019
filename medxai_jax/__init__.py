"""medxai-jax: training and explaining medical-image classifiers in JAX."""

__version__ = "0.1.0"
