"""kard_jax.tasks."""
