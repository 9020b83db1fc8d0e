"""One rule for model and tokenizer arguments: an existing path is local, else a valid repo id goes to the hub
(``hf://`` forces it), and a failure names both readings. Saved files get the usual mode."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

import bunmyaku
from bunmyaku.models.bert import BertConfig, BertModel
from tests.pipelines.tiny_models import MINILM_TOKENIZER_FILES


@pytest.fixture
def folder(tmp_path, minilm_dir):
    """``runs/agnews`` under a fresh working directory: a tiny BERT and MiniLM's tokenizer (a path with one /)."""
    path = tmp_path / "runs" / "agnews"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37)
    BertModel.from_config(config).save_pretrained(path)
    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, path / name)
    return path


@pytest.fixture
def hub(monkeypatch):
    """``snapshot_download`` replaced: records each call and serves the folders in ``repos``."""
    calls, repos = [], {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns or ())))
        if repo_id not in repos:
            raise OSError(f"repository {repo_id} not found")
        return str(repos[repo_id])

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls, repos


def test_an_existing_folder_is_local_even_when_it_looks_like_a_repo_id(folder, hub, monkeypatch):
    monkeypatch.chdir(folder.parents[1])
    calls, _ = hub
    assert isinstance(bunmyaku.from_pretrained("runs/agnews"), BertModel)
    assert bunmyaku.Tokenizer.from_pretrained("runs/agnews")("hello", return_tensors="pt")["input_ids"].shape == (1, 3)
    assert calls == []


def test_a_missing_path_names_the_folder_and_the_hub_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    for kind, load in [("model", bunmyaku.from_pretrained), ("tokenizer", bunmyaku.Tokenizer.from_pretrained)]:
        with pytest.raises(FileNotFoundError) as error:
            load("runs/agnews")
        message = str(error.value)
        assert f"local {kind} path {tmp_path / 'runs' / 'agnews'} does not exist" in message, message
        assert "hub repo runs/agnews is not reachable" in message and "hf://runs/agnews" in message, message


def test_one_repo_id_rule_for_models_and_tokenizers(folder, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls, repos = hub
    repos["gpt2"] = repos["org/name"] = folder
    # a name without an org is a valid repo id for both (the tokenizer once required org/name)
    assert isinstance(bunmyaku.from_pretrained("gpt2"), BertModel)
    assert bunmyaku.Tokenizer.from_pretrained("gpt2").vocab_size == 30522
    assert [repo for repo, _ in calls] == ["gpt2", "gpt2"]
    assert "*.safetensors" in calls[0][1] and "*.safetensors" not in calls[1][1]  # the tokenizer fetches less
    # hf:// always means the hub, even when a local folder has the same name
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert isinstance(bunmyaku.from_pretrained("hf://org/name"), BertModel)
    assert calls[-1][0] == "org/name"
    calls.clear()
    with pytest.raises(FileNotFoundError, match="does not exist$"):
        bunmyaku.from_pretrained("./runs/missing")  # not a repo id: the hub is never asked
    with pytest.raises(FileNotFoundError, match="does not exist$"):
        bunmyaku.Tokenizer.from_pretrained(Path("runs/missing"))  # a Path is always local
    with pytest.raises(ValueError, match="not a valid hub repo id"):
        bunmyaku.Tokenizer.from_pretrained("hf://a/b/c")
    assert calls == []


def test_saved_files_get_the_usual_mode(folder, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "saved"
        bunmyaku.from_pretrained(folder).save_pretrained(out)
        bunmyaku.Tokenizer.from_pretrained(folder).save_pretrained(out)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(modes)
    assert set(modes.values()) == {0o644}, {name: oct(mode) for name, mode in modes.items()}
