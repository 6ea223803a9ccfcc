"""The embedded default: a generated miniature KARD world and an end-to-end run over it."""
