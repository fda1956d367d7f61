"""Names shared by the post-hoc tools, the command line and the model card, in a module
light enough for ``hf-wavg --help`` to import."""

MERGE_FILE = "wavg_merge.json"  # how an average or soup was made, beside its weights
WISE_FT_FILE = "wavg_wise_ft.json"  # the WiSE-FT sweep, beside the weights at the chosen alpha
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
