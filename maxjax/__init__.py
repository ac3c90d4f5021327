"""maxjax: MoE-Attention separation in JAX/Flax."""

__version__ = "0.1.0"
