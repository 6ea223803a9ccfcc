"""kard_jax.teacher."""
