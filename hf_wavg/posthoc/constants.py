"""Defaults of the post-hoc tools, in a module light enough for ``hf-wavg --help`` to import."""

from hf_wavg.records import MERGE_FILE, WISE_FT_FILE  # noqa: F401  (until merge.py and soups.py import records)

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
