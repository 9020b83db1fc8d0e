"""The ``bunmyaku`` command: help and the demo smoke test."""

from __future__ import annotations

from typer.testing import CliRunner

from bunmyaku.cli import app

runner = CliRunner()


def test_help_lists_the_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_demo_runs_offline(minilm_dir, smollm2_gguf):
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "all-MiniLM-L6-v2" in result.output
    assert "bunmyaku-bert-ja-small" in result.output and "私は学校[MASK]行きます。 -> に" in result.output
    assert "A man is eating a piece of bread." in result.output
    assert "search: 'Which film is good?' -> The new movie is" in result.output
    assert "SmolLM2-135M-Instruct" in result.output and "few-shot English -> French" in result.output
    assert "Attention" in result.output  # the chat reply to the attention question (greedy, deterministic)
