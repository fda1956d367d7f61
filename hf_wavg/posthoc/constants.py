"""Defaults and choices of the post-hoc tools, in a module light enough for ``hf-wavg --help``."""

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# How LoRA adapters are combined (hf_wavg.posthoc.lora_update); "auto" picks one by the inputs.
LORA_MODES = ("exact", "svd", "factors")
SOUP_METHODS = ("uniform", "greedy", "model-stock")
