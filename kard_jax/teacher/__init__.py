"""kard_jax.teacher: teacher LLM rationales -- few-shot prompts (`prompts`), an OpenAI-compatible
client with retries and a resumable cache (`client`), importers, filtering, the output store and
the run modes (`run`)."""
