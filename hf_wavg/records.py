"""The names of every file hf_wavg writes beside weights or into checkpoints, in one place
(as PEFT's ``utils/constants.py`` holds its file names). Plain strings: the command line
and the Hub upload import them without loading torch."""

# In every checkpoint folder: the averager's state.
STATE_FILE = "wavg_state.json"  # the record: settings, counters, and the tensor files it lists
STATE_TENSOR_PREFIX = "wavg_state-"  # its tensor files: wavg_state-<rank>-of-<world>-<token>.safetensors
# With several named averages, each keeps its state in a folder of its own: wavg_averages/<name>/.
AVERAGES_DIR = "wavg_averages"

# Beside saved weights: how they were made. Each is rendered by hf_wavg.model_card.
AVERAGING_FILE = "wavg_averaging.json"  # WAvgTrainer.averaging_summary(): the running average's settings
MERGE_FILE = "wavg_merge.json"  # an average or soup of saved checkpoints (hf-wavg average, soup)
WISE_FT_FILE = "wavg_wise_ft.json"  # the WiSE-FT sweep, beside the weights at the chosen alpha
POSTHOC_EMA_FILE = "wavg_posthoc_ema.json"  # a post-hoc EMA synthesised from stored profiles

# hf-wavg compare's output (and, in a model folder, the card's comparison section): the paired
# record, its tables in Markdown, and a plot of the differences.
COMPARE_FILE = "compare.json"
COMPARE_MARKDOWN_FILE = "compare.md"
COMPARE_PLOT_FILE = "compare.png"

# Beside saved weights: the model card (hf_wavg.card_file), as the Hub reads it.
MODEL_CARD_FILE = "README.md"

# Beside saved weights and in the output folder: the safety suite's history over training.
SAFETY_REPORT_FILE = "safety_report.json"
SAFETY_PLOT_FILE = "safety_metrics.png"

# Keys of the safety report's history: which weights each entry measured.
SAFETY_WEIGHTS = ("average", "raw")
SAFETY_DELTA = "delta"  # entries holding average minus raw, paired


def named_file(file_name: str, name: str | None) -> str:
    """``file_name`` for the named average ``name`` (``safety_report-ema.json``); unchanged
    for None, the single average."""
    if name is None:
        return file_name
    stem, dot, extension = file_name.rpartition(".")
    return f"{stem}-{name}{dot}{extension}"
