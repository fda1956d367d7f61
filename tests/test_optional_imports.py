"""The core path needs nothing outside ``install_requires``: in a process where the optional
packages (Jupyter, TensorBoard, W&B, TRL, the test tools) cannot be found, a ``WAvgTrainer``
fine-tune with the safety suite, evaluation and a save runs, and none of them is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Installed in the test environment, absent from a `pip install hf-wavg` one.
OPTIONAL = ("IPython", "ipykernel", "jupyter_client", "jupyter_core", "nbformat", "nbclient", "tensorboard",
            "tensorboardX", "wandb", "mlflow", "comet_ml", "trl", "ema_pytorch", "hypothesis", "pytest")

SCRIPT = textwrap.dedent("""
    import json, sys
    from importlib.machinery import PathFinder

    OPTIONAL = set(sys.argv[1].split(","))
    HIDDEN = {name.lower() for name in OPTIONAL}  # distribution names, normalised

    class WithoutOptional:
        '''The path finder, blind to the optional packages: to import statements, to
        importlib.util.find_spec (which transformers asks) and to importlib.metadata they are
        not installed.'''
        def find_spec(self, name, path=None, target=None):
            return None if name.partition(".")[0] in OPTIONAL else PathFinder.find_spec(name, path, target)
        def find_distributions(self, *args, **kwargs):
            for dist in PathFinder.find_distributions(*args, **kwargs):
                if (dist.metadata["Name"] or "").lower().replace("-", "_") not in HIDDEN:
                    yield dist
        def invalidate_caches(self):
            PathFinder.invalidate_caches()

    sys.meta_path[:] = [WithoutOptional() if finder is PathFinder else finder for finder in sys.meta_path]
    try:
        import IPython  # noqa: F401
        raise SystemExit("the finder did not hide IPython")
    except ModuleNotFoundError:
        pass

    from transformers import AutoModelForSequenceClassification
    from hf_wavg import SafetyConfig, WAvgConfig, WAvgTrainer
    from tests.trainer_helpers import SMALL_SAFETY, make_trainer, safety_texts

    out = sys.argv[2]
    trainer = make_trainer(sys.argv[3], out, WAvgConfig(method="ema", evaluate_raw=True), max_steps=4,
                           eval_strategy="steps", eval_steps=4, disable_tqdm=False,
                           safety_config=SafetyConfig(**SMALL_SAFETY), safety_dataset=safety_texts())
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(out + "/saved")
    AutoModelForSequenceClassification.from_pretrained(out + "/saved")
    loaded = sorted({name.partition(".")[0] for name in sys.modules} & OPTIONAL)
    print(json.dumps({"loaded": loaded, "metrics": sorted(metrics),
                      "notebook": "transformers.utils.notebook" in sys.modules}))
""")


@pytest.mark.slow
def test_a_fine_tune_with_safety_evaluation_and_save_needs_no_optional_package(tmp_path, minilm_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(OPTIONAL), str(tmp_path), minilm_path],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and not report["notebook"]
    assert {"eval_loss", "eval_raw_loss"} <= set(report["metrics"])
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_the_notebook_progress_bar_is_still_kept_off_the_safety_logs():
    pytest.importorskip("IPython")
    from transformers import TrainerCallback
    from transformers.utils.notebook import NotebookProgressCallback

    from hf_wavg.trainer import _prints_to_console

    assert _prints_to_console(NotebookProgressCallback())
    assert not _prints_to_console(TrainerCallback())
