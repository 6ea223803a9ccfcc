"""kard_jax.training."""
