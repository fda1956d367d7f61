"""Publishing: what WAvgTrainer.push_to_hub and ``hf-wavg push`` would upload, captured by
pointing HfApi's repo creation and commit at a recorder (no network)."""

from __future__ import annotations

import importlib
import io
import json
import logging
import re
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.hf_api
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard import metadata_load
from safetensors.torch import load as load_safetensors

from hf_wavg import SafetyConfig, WAvgConfig
from hf_wavg.card_file import model_card_text
from hf_wavg.cli import main
from hf_wavg.posthoc import average_checkpoints
from hf_wavg.records import SAFETY_PLOT_FILE as PLOT_FILE
from hf_wavg.records import SAFETY_REPORT_FILE as REPORT_FILE
from hf_wavg.safety.catalog import HEADLINE_METRICS
from tests.trainer_helpers import SMALL_SAFETY as SMALL
from tests.trainer_helpers import averaged_named, make_trainer, safety_texts

pytestmark = pytest.mark.slow

TOKEN = "hf_recorderTestToken0123456789"


class HubRecorder:
    """Stands in for the Hub: records created repos and each commit's files."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        recorder = self

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            recorder.repos.append({"repo_id": repo_id, "private": private, "token": token or api.token})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, *, commit_message, token=None, revision=None, **kwargs):
            for op in operations:
                source = op.path_or_fileobj
                data = Path(source).read_bytes() if isinstance(source, (str, Path)) else (
                    source.getvalue() if isinstance(source, io.BytesIO) else bytes(source))
                recorder.files[op.path_in_repo] = data
            recorder.commits.append({"repo_id": repo_id, "message": commit_message, "revision": revision})
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                              commit_message=commit_message, commit_description="", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda *args, **kwargs: None)  # a Hub call
        monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # one plain commit

    def card(self) -> str:
        return self.files["README.md"].decode("utf-8")


@pytest.fixture()
def hub(monkeypatch) -> HubRecorder:
    recorder = HubRecorder()
    recorder.install(monkeypatch)
    return recorder


def table_row(card: str, title: str) -> list[str]:
    line = next(line for line in card.splitlines() if line.startswith(f"| {title} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def assert_token_never_shown(recorder: HubRecorder, *outputs: str) -> None:
    for name, data in recorder.files.items():
        assert TOKEN.encode() not in data, name
    for text in outputs:
        assert TOKEN not in text


def test_trainer_push_uploads_the_average_with_a_card_matching_its_reports(tmp_path, minilm_path, hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(evaluate_raw=True), eval_strategy="steps",
                           eval_steps=4, hub_model_id="someone/averaged-minilm",
                           safety_config=SafetyConfig(**SMALL), safety_dataset=safety_texts())
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub(token=TOKEN)

    assert hub.repos == [{"repo_id": "someone/averaged-minilm", "private": None, "token": TOKEN}]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "wavg_averaging.json", REPORT_FILE, PLOT_FILE} <= set(hub.files)

    # The uploaded weights are the average, not the raw weights.
    uploaded = load_safetensors(hub.files["model.safetensors"])
    average = averaged_named(trainer.averager)
    for name, tensor in average.items():
        torch.testing.assert_close(uploaded[name], tensor.to(uploaded[name].dtype), rtol=0, atol=0)
    raw = dict(trainer.model.named_parameters())
    assert any(not torch.equal(uploaded[n], raw[n].detach()) for n in average)

    # The card's tables say what the uploaded records say.
    card = hub.card()
    summary = json.loads(hub.files["wavg_averaging.json"])
    assert table_row(card, "num_updates") == [str(summary["averager"]["num_updates"])]
    assert table_row(card, "method") == [summary["averager"]["method"]]
    evaluation = summary["last_evaluation"]
    assert table_row(card, "loss") == [f"{evaluation['eval_loss']:.4f}", f"{evaluation['eval_raw_loss']:.4f}"]
    report = json.loads(hub.files[REPORT_FILE])
    latest = {e["weights"]: e["metrics"] for e in report["history"]}
    key, title = HEADLINE_METRICS[0]
    expected = [f"{m[key]:.3f} [{m[key + '_ci_low']:.3f}, {m[key + '_ci_high']:.3f}]"
                for m in (latest["average"], latest["raw"])]
    delta = latest["delta"]
    expected.append("{:+.3f} [{:+.3f}, {:+.3f}]".format(
        *(delta[f"delta/{key}{end}"] for end in ("", "_ci_low", "_ci_high"))))
    assert table_row(card, title) == expected
    assert f"]({PLOT_FILE})" in card
    captured = capsys.readouterr()
    assert_token_never_shown(hub, captured.out, captured.err, caplog.text)

    # The metadata's evaluation results parse back and are the saved average's: the pushed card,
    # and the card `hf-wavg push` writes for the same records in a folder without one.
    (tmp_path / "pushed.md").write_text(card, encoding="utf-8")
    trainer.save_model(str(tmp_path / "saved"))
    (tmp_path / "saved" / "README.md").unlink(missing_ok=True)
    (tmp_path / "written.md").write_text(model_card_text(tmp_path / "saved"), encoding="utf-8")
    for name in ("pushed.md", "written.md"):
        results = {r.metric_type: r for r in ModelCard.load(tmp_path / name).data.eval_results}
        assert results["loss"].metric_value == pytest.approx(evaluation["eval_loss"], rel=1e-12)
        assert results["loss"].task_type == "text-classification"
        assert not any(metric.startswith("raw_") for metric in results)  # the raw weights are not this model
        shown = [(key, title) for key, title in HEADLINE_METRICS if latest["average"].get(key) is not None]
        assert shown
        for key, title in shown:
            result = results[key.replace("/", "_")]
            assert result.metric_value == pytest.approx(latest["average"][key], rel=1e-12)
            assert (result.metric_name, result.dataset_type, result.dataset_config) == (
                title, "hf_wavg-safety-suite", ",".join(report["config"]["safety_languages"]))
            assert result.dataset_args["safety_attack_examples"] == report["config"]["safety_attack_examples"]


def test_cli_push_of_an_average_uploads_weights_config_tokenizer_and_card(checkpoints, tmp_path, hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = average_checkpoints(checkpoints, tmp_path / "avg", progress=False)
    assert main(["push", str(out), "someone/minilm-soup", "--token", TOKEN, "--private"]) == 0

    assert hub.repos[0]["private"] is True and hub.repos[0]["token"] == TOKEN
    assert set(hub.files) == {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                              "wavg_merge.json", "README.md"}
    assert hub.files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = hub.card()
    (tmp_path / "card.md").write_text(card, encoding="utf-8")
    assert set(metadata_load(tmp_path / "card.md")["tags"]) >= {"hf-wavg", "weight-averaging"}
    rows = {row[0]: row[1:] for row in (
        [c.strip() for c in line.strip("|").split("|")] for line in card.splitlines() if line.startswith("| checkpoint-"))}
    assert rows == {f"checkpoint-{s}": [str(s), "0.3333"] for s in (2, 4, 6)}
    captured = capsys.readouterr()
    assert_token_never_shown(hub, captured.out, captured.err, caplog.text)


def test_push_refuses_raw_checkpoints_and_never_uploads_training_state(checkpoints, tmp_path, hub, capsys):
    raw = checkpoints[2]
    assert main(["push", str(raw), "someone/raw", "--token", TOKEN]) == 2
    error = capsys.readouterr().err
    assert "not an average" in error and TOKEN not in error and not hub.files

    copy = tmp_path / "raw"
    import shutil

    shutil.copytree(raw, copy)
    assert main(["push", str(copy), "someone/raw", "--allow-unaveraged", "--token", TOKEN]) == 0
    assert "model.safetensors" in hub.files
    assert not {n for n in hub.files if re.match(r"(optimizer|scheduler|rng_state|trainer_state|training_args)", n)}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def push_fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``hf-wavg push argv`` failed like argparse: exit status 2 and one line on stderr."""
    assert main(["push", *argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-wavg push: error: "), lines
    return lines[0]


def logged_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token in the environment and no saved login."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))


def network_down() -> Exception:
    """What huggingface_hub's HTTP client raises without a network (httpx's, not an OSError)."""
    client = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    return getattr(client, "ConnectError", getattr(client, "ConnectionError", ConnectionError))(
        "[Errno -2] Name or service not known")


def test_push_without_a_token_or_offline_fails_in_one_line_and_leaves_the_folder_as_it_was(
        checkpoints, tmp_path, capsys, monkeypatch):
    out = average_checkpoints(checkpoints[:2], tmp_path / "avg", progress=False)
    before = folder_bytes(out)
    sent = []
    monkeypatch.setattr(HfApi, "create_repo", lambda *args, **kwargs: sent.append(args))

    logged_out(monkeypatch, tmp_path)
    assert "no Hugging Face token" in push_fails(capsys, str(out), "someone/avg")
    assert not sent  # checked before anything is sent
    monkeypatch.undo()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = push_fails(capsys, str(out), "someone/avg", "--token", TOKEN)
    assert "offline mode is enabled" in line and TOKEN not in line
    assert folder_bytes(out) == before  # no README.md written into it


def test_push_failing_mid_upload_or_succeeding_never_modifies_the_folder(checkpoints, tmp_path, hub, capsys,
                                                                           monkeypatch):
    out = average_checkpoints(checkpoints[:2], tmp_path / "avg", progress=False)
    before = folder_bytes(out)

    def unreachable(*args, **kwargs):
        raise network_down()

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_commit", unreachable)
        line = push_fails(capsys, str(out), "someone/avg", "--token", TOKEN)
    assert "Name or service not known" in line and TOKEN not in line
    assert folder_bytes(out) == before

    assert main(["push", str(out), "someone/avg", "--token", TOKEN]) == 0
    assert "## Checkpoint averaging (hf_wavg)" in hub.card()  # the card went up from memory
    assert folder_bytes(out) == before
