"""The names of the serving exports (:mod:`multitoken.hf.serve_export`), importable without
transformers' model classes (the CLI lists them in ``export --format``)."""

__all__ = ["SERVE_FORMATS"]

# mimo_mtp: a MiMoForCausalLM folder; eagle: the target and its EAGLE-1 drafts (docs/serving.md).
SERVE_FORMATS = ("mimo_mtp", "eagle")
