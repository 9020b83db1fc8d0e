"""bench/ladder.py's pieces on a tiny Llama: a rung runs the Trainer in a fresh process (two under torchrun) and
measures bytes that equal an independent count (``transformers``' model of the same config); the table has a line
for every rung, with the planner beside the measurement and the rungs that cannot run said so."""

from __future__ import annotations

import pytest

from bench.ladder import MODEL, ladder, measure_rung, planned, refusal, table
from bench.memory_plan import llama_config
from tests.conftest import require_module

TINY = {**llama_config(32, 2, 4, 2, vocab=99), "intermediate_size": 64}
MB = 2**20


def _hf_parameters() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of transformers' LlamaForCausalLM of TINY (tied tensors once)."""
    transformers = require_module("transformers")
    config = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _rung(name: str):
    return next(r for r in ladder(8, TINY) if r.name == name)


def test_a_rung_trains_and_measures_what_it_holds():
    shapes = _hf_parameters()
    trainable = {n: s for n, s in shapes.items() if not n.startswith("model.layers.0.")}  # the lower 1 of 2 frozen
    (rank,) = measure_rung(_rung("freezing"), TINY, max_length=16, warmup=1, steps=1, threads=1)
    assert rank["tokens_per_s"] > 0 and rank["peak_rss"] > 0
    assert rank["parameters"] == 4 * sum(_numel(s) for s in shapes.values())
    assert rank["gradients"] == 4 * sum(_numel(s) for s in trainable.values())
    # AdamW: exp_avg and exp_avg_sq like the parameter, and a float32 step per parameter
    assert rank["optimizer"] == 2 * rank["gradients"] + 4 * len(trainable)
    # at the optimizer step every gradient and state tensor is live beside the weights; the activations came before
    assert rank["peak"] >= rank["parameters"] + rank["gradients"] + rank["optimizer"]


def test_a_qlora_rung_holds_the_quantized_bytes():
    """The base's linears at bitsandbytes' nf4 bytes, the rest (token table, norms, adapters) in float32."""
    require_module("bitsandbytes")
    from bunmyaku.models.quantize import quantized_bytes

    shapes = _hf_parameters()
    linears = {n: s for n, s in shapes.items() if n.startswith("model.layers.") and len(s) == 2}
    rung = _rung("qlora-nf4")
    (rank,) = measure_rung(rung, TINY, max_length=16, warmup=1, steps=1, threads=1)
    # LoRA r=8 on q_proj and v_proj of each layer: A (8, 32) and B (out, 8)
    adapters = sum(
        8 * 32 + shapes[f"model.layers.{i}.self_attn.{m}.weight"][0] * 8 for i in range(2) for m in ("q_proj", "v_proj")
    )
    floats = sum(_numel(s) for n, s in shapes.items() if n not in linears) + adapters
    assert rank["parameters"] == 4 * floats + sum(quantized_bytes(s, "nf4") for s in linears.values())
    assert rank["gradients"] == 4 * adapters
    assert rank["parameters"] < 4 * sum(_numel(s) for s in shapes.values())


@pytest.mark.distributed
def test_fsdp_on_two_ranks_holds_half_the_state_on_each():
    shapes = _hf_parameters()
    whole = 4 * sum(_numel(s) for s in shapes.values())
    ranks = measure_rung(_rung("fsdp-2"), TINY, max_length=16, warmup=1, steps=1, threads=1)
    assert [r["rank"] for r in ranks] == [0, 1]
    # each rank keeps its rows of every tensor: the shards add up to the whole, rank 0 holds the larger halves
    assert sum(r["parameters"] for r in ranks) == whole
    assert sum(r["gradients"] for r in ranks) == whole
    assert whole / 2 <= ranks[0]["parameters"] < whole
    assert all(r["peak"] > r["parameters"] + r["optimizer"] and r["tokens_per_s"] > 0 for r in ranks)


def test_the_table_has_every_rung_with_the_planner_beside_the_measurement():
    rungs = ladder(8, TINY)
    assert [r.name for r in rungs] == [
        "baseline", "accumulation", "checkpointing", "freezing", "lora", "qlora-nf4", "qlora-int8", "fsdp-2", "tp-2",
        "cpu-offload",
    ]  # fmt: skip
    # the same tokens per optimizer step in every rung (tensor parallel: the 2 ranks read the same batch)
    assert {r.micro_batch * r.accum * r.processes // r.tp for r in rungs} == {8}
    refusals = {r.name: refusal(r, TINY) for r in rungs}
    assert all(reason is None for name, reason in refusals.items() if name != "cpu-offload")
    assert "already on the CPU" in refusals["cpu-offload"]
    # the Trainer's own checks, before any process starts: the benchmark's model splits for tensor parallelism
    assert [r.name for r in ladder(8, MODEL) if refusal(r, MODEL)] == ["cpu-offload"]
    assert "intermediate_size" in refusal(_rung("tp-2"), {**TINY, "intermediate_size": 65})
    assert planned(_rung("tp-2"), TINY, 16)["parameters"] < planned(_rung("baseline"), TINY, 16)["parameters"]
    assert planned(_rung("fsdp-2"), TINY, 16)["parameters"] < planned(_rung("baseline"), TINY, 16)["parameters"]

    plan = {"parameters": 1 * MB, "gradients": 1 * MB, "optimizer": 2 * MB, "total": 11 * MB}
    rank = {"parameters": 1 * MB, "gradients": 1 * MB, "optimizer": 2 * MB, "peak": 10 * MB, "peak_rss": 300 * MB}
    rows = []
    for i, rung in enumerate(rungs):
        ranks = [{**rank, "tokens_per_s": 100.0 + i + r} for r in range(rung.processes)]
        refused = refusals[rung.name]
        rows.append({
            "rung": vars(rung),
            "planned": None if refused else plan,
            "ranks": None if refused else ranks,
            "not_run": refused,
        })  # fmt: skip
    lines = table(rows).splitlines()
    assert len(lines) == 2 + len(rungs)
    for rung, line in zip(rungs, lines[2:], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == rung.label
        if rung.name == "cpu-offload":
            assert cells[2] == f"not run: {refusals['cpu-offload']}"
        else:
            # the slowest rank's rate, the planner's 11 MB against the measured 10 MB, the exact counts agreeing
            assert cells[2] == str(100 + rungs.index(rung))
            state = " / ".join(["4"] * rung.processes) + " (= planner)"
            assert (cells[3], cells[5], cells[6]) == (state, "11", "+10.0%")
