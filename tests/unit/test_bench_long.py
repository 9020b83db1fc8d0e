"""The long-input benchmark's plumbing (``bench/long_attention.py``, rows ``long/...`` of ``python -m bench``).

A tiny model at a short length through all three implementations in both modes, in this process (no timing is
asserted): times and memory come back, and the two Longformers compute the same thing.
"""

from __future__ import annotations

import pytest

from tests.conftest import require_module

require_module("transformers")

import bench.__main__ as harness  # noqa: E402
from bench import long_attention  # noqa: E402

TINY = {
    **long_attention.CONFIG,
    "vocab_size": 99,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "attention_window": 16,
}


def test_all_three_implementations_run_both_modes_and_the_longformers_agree(tmp_path, monkeypatch):
    length = 64  # four windows: the windowed attention is not dense here
    monkeypatch.setattr(long_attention, "CONFIG", TINY)
    dirs = long_attention.build_checkpoints(length, tmp_path)
    assert dirs["transformers"] == dirs["bunmyaku"] != dirs["dense"]

    def runner(impl, model_dir, length, mode, settings):  # in this process: fresh ones take seconds each
        return long_attention.worker(impl, str(model_dir), length, mode, settings)

    monkeypatch.setattr(long_attention, "build_checkpoints", lambda n, root: dirs)
    settings = {"reps": 2, "warmup": 0, "threads": 1, "device": "cpu", "dtype": "float32"}
    names = long_attention.row_names("cpu", [length])
    assert names == ["long/train/64", "long/infer/64"]
    seen = []
    rows = long_attention.run_rows(names, settings, on_row=lambda name, row: seen.append(name), runner=runner)
    assert seen == names
    for name in names:
        row = rows[name]
        for impl in long_attention.IMPLS:
            result = row[impl]
            assert result["mode"] == long_attention.parse_row(name)[0] and result["length"] == length
            assert len(result["times"]) == 2 and all(t > 0 for t in result["times"]), (name, impl)
            assert len(result["cpu_times"]) == 2 and all(t > 0 for t in result["cpu_times"]), (name, impl)
            assert result["peak_mib"] >= 0 and result["checksum"] != 0, (name, impl)
        assert row["bunmyaku"]["checksum"] == pytest.approx(row["transformers"]["checksum"], rel=1e-4, abs=1e-6)
    train, infer = rows["long/train/64"], rows["long/infer/64"]
    # dropout is off: training and inference compute the same outputs
    assert train["bunmyaku"]["checksum"] == pytest.approx(infer["bunmyaku"]["checksum"], rel=1e-4, abs=1e-6)

    text = long_attention.table(rows)
    assert text.count("| 64 |") == 2 and "**train**" in text and "**infer**" in text
    assert "| - |" not in text.split("| 64 |")[1].split("\n")[0]  # every cell filled, the CPU-time ratio too
    assert "the two compute the same function" in long_attention.section(rows, "a machine", "cpu")
    rows["long/infer/64"]["bunmyaku"]["checksum"] += 0.01  # a windowed model that computed something else
    assert "Warning" in long_attention.section(rows, "a machine", "cpu")


def test_the_dense_model_holds_the_longformers_weights(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    monkeypatch.setattr(long_attention, "CONFIG", TINY)
    dirs = long_attention.build_checkpoints(40, tmp_path)
    long = load_file(dirs["bunmyaku"] / "model.safetensors")
    dense = load_file(dirs["dense"] / "model.safetensors")
    assert long["embeddings.position_embeddings.weight"].shape[0] == 42  # length + RoBERTa's offset of 2
    only_long = {f"encoder.layer.{i}.attention.self.{p}_global.{w}" for i in (0, 1) for p in ("query", "key", "value")
                 for w in ("weight", "bias")}  # fmt: skip
    assert set(long) - set(dense) == only_long and set(dense) <= set(long)
    for key, value in dense.items():
        assert torch.equal(value, long[key]), key


_PROBE = """
import json, torch
from bench import long_attention
with long_attention.peak_memory("cpu") as peak:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
print(json.dumps(peak))
"""


def test_peak_memory_sees_an_allocation_inside_the_block():
    # in a fresh process with the workers' malloc setting, as the benchmark measures: inside a long test session
    # glibc may serve the block from heap pages an earlier test left resident, which no peak would see
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(long_attention.__file__).resolve().parents[1]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True, cwd=root)
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    if not peak["exact"]:
        pytest.skip("this kernel does not let a process reset its peak resident set (/proc/self/clear_refs)")
    assert 60 <= peak["mib"] < 200


def test_only_names_pick_the_long_rows_and_an_empty_pattern_leaves_them_out():
    assert harness.long_rows_named([""], "cpu") == []  # a plain `python -m bench` stays as long as before
    assert harness.long_rows_named(["long/train/4096"], "cpu") == ["long/train/4096"]
    assert harness.long_rows_named(["long/infer"], "cpu") == [f"long/infer/{n}" for n in long_attention.LENGTHS]
    assert "long/train/32768" in harness.long_rows_named(["long/"], "cuda")
    assert "long/train/32768" not in harness.long_rows_named(["long/"], "cpu")
    with pytest.raises(ValueError, match="long/<train|infer>/<tokens>"):
        long_attention.parse_row("long/fwd/4096")
