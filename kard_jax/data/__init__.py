"""kard_jax.data: benchmark readers (`readers`), the `Example` record (`example`) and the one
place that formats student prompts and parses answers (`prompts`)."""
