"""Post-hoc tools on saved checkpoints: streaming averages (LoRA adapters in update space too), uniform, greedy and
Model Stock soups, WiSE-FT, post-hoc EMA, and the paired comparison of any saved models."""

from typing import TYPE_CHECKING

from hf_wavg._lazy import lazy_exports

if TYPE_CHECKING:
    from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointReader
    from hf_wavg.posthoc.compare import Comparison, compare_models
    from hf_wavg.posthoc.ema_synthesis import PostHocEMAResult, load_posthoc_ema_into, posthoc_ema, posthoc_ema_sweep
    from hf_wavg.posthoc.evaluation import ModelEvaluator, greater_is_better
    from hf_wavg.posthoc.lora_update import combine_in_update_space
    from hf_wavg.posthoc.merge import average_checkpoints
    from hf_wavg.posthoc.model_stock import model_stock
    from hf_wavg.posthoc.model_weights import load_average_into
    from hf_wavg.posthoc.soups import SoupResult, greedy_soup, uniform_soup
    from hf_wavg.posthoc.wise_ft import WiseFT, WiseFTResult, wise_ft

# Names resolve on first use: `import hf_wavg` (and `hf-wavg --help`) stays fast, and
# transformers, peft and evaluate load only when something needs them.
_EXPORTS = {
    "CheckpointError": "hf_wavg.posthoc.checkpoints",
    "CheckpointReader": "hf_wavg.posthoc.checkpoints",
    "Comparison": "hf_wavg.posthoc.compare",
    "compare_models": "hf_wavg.posthoc.compare",
    "ModelEvaluator": "hf_wavg.posthoc.evaluation",
    "greater_is_better": "hf_wavg.posthoc.evaluation",
    "average_checkpoints": "hf_wavg.posthoc.merge",
    "combine_in_update_space": "hf_wavg.posthoc.lora_update",
    "model_stock": "hf_wavg.posthoc.model_stock",
    "PostHocEMAResult": "hf_wavg.posthoc.ema_synthesis",
    "PosthocEMAResult": "hf_wavg.posthoc.ema_synthesis",
    "load_posthoc_ema_into": "hf_wavg.posthoc.ema_synthesis",
    "posthoc_ema": "hf_wavg.posthoc.ema_synthesis",
    "posthoc_ema_sweep": "hf_wavg.posthoc.ema_synthesis",
    "load_average_into": "hf_wavg.posthoc.model_weights",
    "SoupResult": "hf_wavg.posthoc.soups",
    "greedy_soup": "hf_wavg.posthoc.soups",
    "uniform_soup": "hf_wavg.posthoc.soups",
    "WiseFT": "hf_wavg.posthoc.wise_ft",
    "WiseFTResult": "hf_wavg.posthoc.wise_ft",
    "wise_ft": "hf_wavg.posthoc.wise_ft",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "Comparison",
    "ModelEvaluator",
    "PostHocEMAResult",
    "SoupResult",
    "WiseFT",
    "WiseFTResult",
    "average_checkpoints",
    "combine_in_update_space",
    "compare_models",
    "greater_is_better",
    "greedy_soup",
    "load_average_into",
    "load_posthoc_ema_into",
    "model_stock",
    "posthoc_ema",
    "posthoc_ema_sweep",
    "uniform_soup",
    "wise_ft",
]
