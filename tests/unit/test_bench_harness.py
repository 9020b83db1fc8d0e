"""The benchmark harness's bookkeeping (no timing is asserted): summaries, ratios, and BENCHMARKS.md sections."""

from __future__ import annotations

import pytest

import bench.__main__ as harness
from bench.pretrain_mfu import flops_per_token, steady_rate


def _result(times, **extra):
    return {"times": times, "tokens": 1000, "peak_rss_mb": 1.0, "peak_gpu_mb": None, "load_avg": 0.5, "threads": 2,
            **extra}  # fmt: skip


def test_summary_median_percentiles_and_throughput():
    summary = harness.summarize(_result([4.0, 1.0, 3.0, 2.0, 5.0], ttft=[0.1, 0.3, 0.2], decode_tps=[10.0, 30.0, 20.0]))
    assert (summary["median"], summary["p10"], summary["p90"]) == (3.0, 1.0, 5.0)
    assert summary["items_per_s"] == pytest.approx(1000 / 3.0)
    assert summary["ttft"] == 0.2 and summary["decode_tps"] == 20.0 and summary["reps"] == 5


def test_cpu_seconds_are_pooled_and_summarised_when_recorded():
    """Workers record each step's process CPU seconds; rows stored before that have none and summarise as before."""
    pooled = harness.pool(
        [_result([1.0], cpu_times=[0.9]), _result([2.0], cpu_times=[1.9]), _result([3.0], cpu_times=[2.8])]
    )
    assert pooled["cpu_times"] == [0.9, 1.9, 2.8] and harness.summarize(pooled)["cpu_median"] == 1.9
    assert "cpu_median" not in harness.summarize(_result([1.0, 2.0]))


def test_speedup_is_time_ratio_or_decode_rate_ratio():
    assert harness.speedup({"median": 3.0}, {"median": 1.5}) == 2.0
    # generation: decode tokens/s after the first token, not whole-call time
    assert harness.speedup({"median": 1.0, "decode_tps": 50.0}, {"median": 1.0, "decode_tps": 75.0}) == 1.5


def test_rounds_alternate_the_implementations_and_pool_their_times(monkeypatch):
    from argparse import Namespace

    from bench.scenarios import Config

    calls = []

    def fake_run_one(config, impl, args):
        calls.append(impl)
        n = len(calls)
        return _result([float(n)], peak_rss_mb=float(10 * n), decode_tps=[float(n)])

    monkeypatch.setattr(harness, "run_one", fake_run_one)
    results = harness.run_config(Config("generate", "smollm2", "b1", 1), Namespace(rounds=3))
    assert calls == ["transformers", "bunmyaku"] * 3  # alternating, so drift over time hits both sides
    hf, ours = results["transformers"], results["bunmyaku"]
    assert hf["times"] == [1.0, 3.0, 5.0] and ours["times"] == [2.0, 4.0, 6.0]
    assert ours["decode_tps"] == [2.0, 4.0, 6.0] and ours["peak_rss_mb"] == 60.0 and ours["rounds"] == 3
    assert harness.summarize(ours)["rounds"] == 3 and harness.summarize(ours)["median"] == 4.0


def test_write_section_replaces_only_its_own_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n\nintro\n")
    harness.write_section("cpu table v1", "cpu")
    harness.write_section("cuda table", "cuda")
    harness.write_section("cpu table v2", "cpu")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "intro" in text and "cuda table" in text and "cpu table v2" in text and "v1" not in text
    assert text.count("<!-- bench:cpu:start -->") == 1


def test_mfu_formula_and_steady_rate():
    # GPT-2 124M, context 1024: 6 N + 12 L d T
    assert flops_per_token(123_689_472, 12, 768, 1024) == 6 * 123_689_472 + 12 * 12 * 768 * 1024
    records = [{"step": s, "elapsed_s": 10.0 + 0.1 * s} for s in (5, 10, 15, 20, 25)] + [{"step": 25, "eval_loss": 1.0}]
    rate, steps = steady_rate(records, tokens_per_step=1000, skip=10)
    assert steps == 10 and rate == pytest.approx(10 * 1000 / 1.0)  # steps 15 -> 25, compilation left out


def test_compiled_rows_are_named_apart_and_listed_after_their_eager_row(monkeypatch):
    from argparse import Namespace

    from bench.scenarios import Config

    eager = Config("encoder-train", "minilm", "variable")
    assert Config("encoder-train", "minilm", "variable", compile="default").name == eager.name + "+compile"
    overhead = Config("encoder-train", "minilm", "variable", compile="reduce-overhead")
    assert overhead.name == eager.name + "+compile:reduce-overhead"
    names = (overhead.name, "generate/smollm2/b1", eager.name + "+compile", "encoder-infer/minilm/fixed", eager.name)
    rows = {n: {} for n in names}
    assert harness.ordered_names(rows) == [
        "encoder-infer/minilm/fixed",
        eager.name,
        eager.name + "+compile",
        overhead.name,
        "generate/smollm2/b1",
    ]

    commands = []

    class Done:
        returncode, stderr = 0, ""
        stdout = 'RESULT {"times": [1.0]}\n'

    monkeypatch.setattr(harness.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or Done())
    args = Namespace(rounds=1, device="cpu", reps=3, warmup=1, budget=0.0, min_reps=1, threads=2, dtype="float32")
    harness.run_one(overhead, "bunmyaku", args)
    command = commands[0]
    assert command[command.index("--compile") + 1] == "reduce-overhead"  # the worker compiles in that mode


def test_profile_step_reports_the_compilers_graph_breaks():
    import torch

    from bench.profile_step import _compiler_account

    torch._dynamo.reset()
    _compiler_account()  # drop what earlier compilations in this process counted

    def f(x):
        y = x * 2
        if y.sum().item() > 0:  # reading a value on the host breaks the graph
            return y + 1
        return y - 1

    torch.compile(f, backend="eager")(torch.ones(3))
    report = _compiler_account()
    assert report.startswith("compiler: 2 graphs"), report
    assert "graph break x1: Unsupported Tensor.item()" in report, report
    assert _compiler_account().startswith("compiler: 0 graphs"), "the counters start again after each report"


def test_same_shape_table_pairs_deberta_with_bert_of_the_same_scenario():
    """bunmyaku DeBERTa against bunmyaku BERT-base: cost ratio of medians, only where both rows are stored."""

    def row(hf, ours):
        return {"transformers": {"median": hf}, "bunmyaku": {"median": ours}}

    rows = {
        "encoder-train/bert-base/fixed": row(2.0, 1.0),
        "encoder-train/deberta-v3-base/fixed": row(6.0, 1.5),
        "encoder-infer/deberta-v3-base/variable": row(3.0, 1.0),  # no bert-base row: left out
    }
    text = harness.same_shape_table(rows)
    lines = text.splitlines()
    assert len(lines) == 3
    assert "encoder-train/deberta-v3-base/fixed | encoder-train/bert-base/fixed" in lines[2]
    assert "**1.50x**" in lines[2]
    assert harness.same_shape_table({"encoder-train/bert-base/fixed": row(2.0, 1.0)}) == ""


def test_bench_number_options_refuse_out_of_range_values_in_one_line(capsys):
    import argparse

    from bench import at_least

    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--steps", type=at_least(1))
    parser.add_argument("--lr", type=at_least(1e-12, float))
    assert parser.parse_args(["--steps", "3", "--lr", "0.5"]).steps == 3
    for argv, message in [
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--steps", "2.5"], "argument --steps: expected an integer, got '2.5'"),
        (["--lr", "nan"], "argument --lr: must be at least 1e-12, got nan"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_peers_alternate_with_both_libraries_and_get_their_own_table(monkeypatch):
    """``--peers``: the DeBERTa kernel packages' processes take turns with transformers' and bunmyaku's, and the
    stored row's ``peers`` become a table of bunmyaku's speed-up over each."""
    from argparse import Namespace

    from bench.scenarios import Config

    calls = []

    def fake_run_one(config, impl, args):
        calls.append(impl)
        return _result([{"transformers": 6.0, "bunmyaku": 2.0, "disentangled-flash": 3.0}[impl]], cpu_times=[1.0])

    monkeypatch.setattr(harness, "run_one", fake_run_one)
    config = Config("encoder-train", "deberta-v3-base", "fixed")
    results = harness.run_config(config, Namespace(rounds=2), ("disentangled-flash",))
    assert calls == ["transformers", "bunmyaku", "disentangled-flash"] * 2
    row = {impl: harness.summarize(r) for impl, r in results.items() if impl in harness.IMPLS}
    row |= {"peers": {"disentangled-flash": harness.summarize(results["disentangled-flash"])}, "when": "now"}
    lines = harness.peers_table({config.name: row}).splitlines()
    assert len(lines) == 3 and "| transformers + disentangled-flash | 3000 ms | 2000 ms | **1.50x** | 1.00x" in lines[2]
    assert harness.peers_table({config.name: {k: v for k, v in row.items() if k != "peers"}}) == ""


def test_usable_peers_say_why_one_is_left_out(monkeypatch):
    import importlib.util

    installed = {"disentangled_flash", "flashdeberta"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert harness.usable_peers("cuda") == (("disentangled-flash", "flashdeberta"), {})
    peers, skipped = harness.usable_peers("cpu")
    assert peers == ("disentangled-flash",) and "CUDA only" in skipped["flashdeberta"]
    installed.clear()
    peers, skipped = harness.usable_peers("cuda")
    assert peers == () and "pip install disentangled-flash" in skipped["disentangled-flash"]


def test_disentangled_flash_peer_is_patched_in_and_computes_transformers_function(tmp_path):
    """The peer the bench times is transformers' DeBERTa with disentangled-flash's attention really swapped in
    (its PyTorch backend on CPU), computing the same logits and gradients: the ratio compares equal functions."""
    pytest.importorskip("disentangled_flash")
    import torch
    import transformers

    from bench.scenarios import _load

    config = transformers.DebertaV2Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        relative_attention=True, position_buckets=16, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    ids = torch.randint(5, 300, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = torch.tensor([0, 2, 1])
    out = {}
    for impl in ("transformers", "disentangled-flash"):
        model = _load(impl, tmp_path, "sequence-classification", "cpu").train()
        out[impl] = model(input_ids=ids, attention_mask=mask, labels=labels)
        out[impl].loss.backward()
        out[impl] = (out[impl].logits.detach(), {n: p.grad for n, p in model.named_parameters()})
        attention = model.deberta.encoder.layer[0].attention.self
        assert (type(attention).__module__.startswith("disentangled_flash")) == (impl == "disentangled-flash")
    (hf_logits, hf_grads), (peer_logits, peer_grads) = out["transformers"], out["disentangled-flash"]
    torch.testing.assert_close(peer_logits, hf_logits, rtol=1e-5, atol=1e-5)
    assert peer_grads.keys() == hf_grads.keys()
    for name, grad in hf_grads.items():
        torch.testing.assert_close(peer_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    base = _load("disentangled-flash", tmp_path, "base", "cpu").eval()  # inference: prepared per length
    base.encoder.prepare_for_inference(ids.shape[1])
    hf_base = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        got = base(input_ids=ids, attention_mask=mask).last_hidden_state
        want = hf_base(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
