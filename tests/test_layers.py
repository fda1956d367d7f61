"""The package's layers hold: each module imports only its own layer and the ones inside it
(the README's architecture section lists them), and ``safety/`` imports nothing else of hf_wavg."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_wavg"
# Inside out; a module's layer is that of its longest listed prefix.
LAYERS = (
    ("hf_wavg._lazy", "hf_wavg._fields", "hf_wavg.records", "hf_wavg.values"),
    ("hf_wavg.averaging",),
    ("hf_wavg.params", "hf_wavg.sharding"),
    ("hf_wavg.state_io", "hf_wavg.averager"),
    ("hf_wavg.safety", "hf_wavg.task_metrics"),
    ("hf_wavg.config",),
    ("hf_wavg.model_card", "hf_wavg.card_results", "hf_wavg.card_file", "hf_wavg.safety_monitor", "hf_wavg.batchnorm", "hf_wavg.teardown", "hf_wavg.loggers", "hf_wavg.callback",
     "hf_wavg.callback_group", "hf_wavg.trainer"),
    ("hf_wavg.posthoc",),
    ("hf_wavg.hub", "hf_wavg.data", "hf_wavg.demo"),
    ("hf_wavg.cli",),
)


def layer_of(module: str) -> int:
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS and to the README's architecture"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The hf_wavg modules ``path`` imports: at the top, inside a function, or for type
    checkers only (``if TYPE_CHECKING:``), since a type-only import still ties a layer to the
    names of the one it reaches."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("hf_wavg.")}


def modules() -> list[tuple[str, Path]]:
    return [(module_name(path), path) for path in sorted(PACKAGE.rglob("*.py"))
            if module_name(path) != "hf_wavg"]


def test_every_module_imports_only_its_layer_and_those_inside_it():
    upward = [f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})"
              for name, path in modules() for imported in imported_modules(path)
              if layer_of(imported) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_safety_is_a_leaf():
    reaching_out = [f"{name} imports {imported}" for name, path in modules() if name.startswith("hf_wavg.safety.")
                    or name == "hf_wavg.safety" for imported in imported_modules(path)
                    if not imported.startswith("hf_wavg.safety") and imported not in ("hf_wavg._lazy", "hf_wavg._fields")]
    assert not reaching_out, "\n".join(reaching_out)


def test_the_checker_sees_a_violation(tmp_path):
    # The test above can fail: an upward import inside a function is found.
    module = tmp_path / "state_io.py"
    module.write_text("def f():\n    from hf_wavg.trainer import WAvgTrainer\n", encoding="utf-8")
    assert imported_modules(module) == {"hf_wavg.trainer"}
    typed = tmp_path / "strategies.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hf_wavg.config import WAvgConfig\n",
                     encoding="utf-8")
    assert imported_modules(typed) == {"hf_wavg.config"}
    assert layer_of("hf_wavg.trainer") > layer_of("hf_wavg.state_io")


def test_every_registered_method_is_exported_at_the_top_level():
    import hf_wavg
    from hf_wavg.averaging.methods import METHODS

    exported = {getattr(hf_wavg, name) for name in hf_wavg.__all__ if name[0].isupper()}
    assert {method.strategy_class() for method in METHODS.values()} <= exported


def test_the_checkpoint_readers_trainer_state_name_is_transformers_own():
    from transformers.trainer import TRAINER_STATE_NAME

    from hf_wavg.posthoc.checkpoints import TRAINER_STATE_FILE

    assert TRAINER_STATE_FILE == TRAINER_STATE_NAME


def readme_layers() -> list[set[str]]:
    """The layers the README's architecture block lists, in order: a line at the left margin
    names modules (``x.py``) and packages (``x/``), continued on the next line after a comma."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Architecture", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    layers: list[set[str]] = []
    continues = False
    for line in block.splitlines():
        if not line or line[0] == " ":
            continues = False
            continue
        names = line.split("  ", 1)[0].strip()
        modules = {"hf_wavg." + name.strip().removesuffix(".py").removesuffix("/")
                   for name in names.split(",") if name.strip()}
        if continues:
            layers[-1] |= modules
        else:
            layers.append(modules)
        continues = names.endswith(",")
    return layers


def test_the_readme_lists_the_layers_this_test_checks():
    assert readme_layers() == [set(layer) for layer in LAYERS]
