"""kard_jax.knowledge."""
