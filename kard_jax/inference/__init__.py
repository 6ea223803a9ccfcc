"""kard_jax.inference."""
