"""The memory planner (``bunmyaku memory``) against measurement.

The oracle is PyTorch's own memory tracker (``torch.distributed._tools.mem_tracker.MemTracker``), which follows
every tensor storage a real training step on the CPU allocates and frees (bench/memory_plan.py runs the step): the
parameter, gradient and optimizer-state bytes must be equal, the activations and the peak within 15%.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bench.memory_plan import Setting, bert_config, gpt2_config, llama_config, measure, predict
from bunmyaku.cli import app
from bunmyaku.training.memory import largest_batch, parse_size, plan_memory
from tests.conftest import require_module

TOLERANCE = 0.15


def _bert(dropout: float = 0.1) -> dict:
    return bert_config(48, 3, 4, vocab=99, dropout=dropout)


def _gpt2() -> dict:
    return {**gpt2_config(48, 3, 4, vocab=99), "n_positions": 128}


def _llama() -> dict:
    return llama_config(48, 3, 4, 2, vocab=99)


SETTINGS = [
    Setting("bert-cls", _bert(), "sequence-classification", 4, 32, num_labels=3),
    Setting("bert-cls-long", _bert(), "sequence-classification", 2, 96, num_labels=3),
    Setting("bert-cls-checkpointing", _bert(), "sequence-classification", 4, 48, True, 0, 3),
    Setting("bert-cls-freeze", _bert(), "sequence-classification", 4, 32, False, 2, 3),
    Setting("bert-no-dropout", _bert(0.0), "sequence-classification", 4, 32, num_labels=2),
    Setting("bert-mlm", _bert(), "masked-lm", 6, 32),
    Setting("bert-tokens", _bert(), "token-classification", 4, 32, num_labels=5),
    Setting("roberta-cls", {**_bert(), "model_type": "roberta", "pad_token_id": 1}, "sequence-classification", 4, 32),
    Setting("gpt2-lm", _gpt2(), "causal-lm", 2, 64),
    Setting("gpt2-lm-checkpointing", _gpt2(), "causal-lm", 3, 48, True),
    Setting("gpt2-lm-freeze", _gpt2(), "causal-lm", 3, 48, False, 2),
    Setting("llama-lm", _llama(), "causal-lm", 4, 40),
    Setting("llama-lm-checkpointing", _llama(), "causal-lm", 4, 40, True),
    Setting("llama-cls", {**_llama(), "pad_token_id": 0}, "sequence-classification", 4, 40, num_labels=3),
    # accumulation: the later micro-batches run beside the gradients of the earlier ones (small batches, so that
    # the gradients weigh: a planner without them is 18-20% under)
    Setting("llama-lm-accumulation", _llama(), "causal-lm", 2, 16, grad_accum=3),
    Setting("gpt2-lm-accumulation", _gpt2(), "causal-lm", 1, 24, grad_accum=2),
    # frozen RMSNorms keep no normalised input (a narrow MLP, so that the norms weigh: 25% over when counted)
    Setting("llama-lm-freeze", {**_llama(), "intermediate_size": 16}, "causal-lm", 4, 40, False, 3),
    # LoRA: frozen norms, and nothing kept below the first adapter (frozen embeddings)
    Setting("llama-lm-lora", _llama(), "causal-lm", 4, 40, lora_r=8, lora_targets="q_proj,v_proj"),
    Setting("bert-cls-lora", _bert(), "sequence-classification", 4, 32, num_labels=3, lora_r=4),
    # GPT-2's c_attn adapter: one A and B in three parts, each with its own optimizer step
    Setting("gpt2-lm-lora", _gpt2(), "causal-lm", 2, 32, lora_r=4),
    # QLoRA: the base's weights at their quantized bytes; under nf4 a base linear keeps no input for backward
    Setting(
        "bert-cls-qlora-nf4",
        bert_config(64, 3, 4, vocab=99),
        "sequence-classification",
        4,
        32,
        num_labels=3,
        lora_r=4,
        lora_quantize="nf4",
    ),
    *(
        Setting(
            f"llama-lm-qlora-{scheme}",
            llama_config(64, 3, 4, 2, vocab=99),
            "causal-lm",
            4,
            40,
            lora_r=8,
            lora_targets="q_proj,v_proj",
            lora_quantize=scheme,
        )
        for scheme in ("nf4", "int8")
    ),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_prediction_matches_measurement(setting):
    if setting.lora_r:
        require_module("peft")
    if setting.lora_quantize:
        require_module("bitsandbytes")
    predicted, measured = predict(setting), measure(setting)
    for exact in ("parameters", "gradients", "optimizer"):
        assert predicted[exact] == measured[exact], exact
    for field in ("activations", "total"):
        error = predicted[field] / measured[field] - 1
        assert abs(error) < TOLERANCE, f"{field}: predicted {predicted[field]:,}, measured {measured[field]:,}"


def _config_file(tmp_path, config: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_checkpointing_and_freezing_shrink_what_they_should(tmp_path):
    path = _config_file(tmp_path, bert_config(64, 6, 4, vocab=99))
    base = plan_memory(path, "sequence-classification", 8, 64, device="cpu")
    checkpointed = plan_memory(path, "sequence-classification", 8, 64, checkpointing=True, device="cpu")
    frozen = plan_memory(path, "sequence-classification", 8, 64, freeze_layers=3, device="cpu")
    assert checkpointed.activations < base.activations / 2
    assert (checkpointed.parameters, checkpointed.gradients) == (base.parameters, base.gradients)
    assert frozen.gradients < base.gradients and frozen.optimizer < base.optimizer
    assert frozen.parameters == base.parameters


def test_fsdp_shards_like_torch_chunk(tmp_path):
    """Per-rank bytes under FSDP: each tensor cut along dim 0 as ``torch.chunk`` cuts it (rank 0's chunk)."""
    from bunmyaku.models.gpt2 import TASKS, GPT2Config

    config = _gpt2()
    path = _config_file(tmp_path, config)
    model = TASKS["causal-lm"](GPT2Config.from_hf(config))
    for world_size in (2, 3, 8):
        plan = plan_memory(path, "causal-lm", 2, 16, strategy="fsdp", world_size=world_size)
        shard = sum(4 * torch.chunk(p.detach(), world_size)[0].numel() for p in model.parameters())
        assert plan.parameters == plan.gradients == shard
        assert plan.optimizer == 2 * shard + 4 * len(list(model.parameters()))
    offloaded = plan_memory(path, "causal-lm", 2, 16, strategy="fsdp", world_size=2, cpu_offload=True)
    assert offloaded.parameters == offloaded.gradients == offloaded.optimizer == 0


@pytest.mark.parametrize(
    ("family", "task", "targets"),
    [("bert", "sequence-classification", "query,value"), ("gpt2", "causal-lm", "c_attn")],
)
def test_lora_counts_equal_peft(tmp_path, family, task, targets):
    """Trainable bytes under LoRA equal what peft trains on the transformers model (adapters, and a new
    classification head as ``modules_to_save``; a language model's head stays frozen)."""
    transformers = require_module("transformers")
    peft = require_module("peft")
    if family == "bert":
        config = _bert()
        hf = transformers.BertForSequenceClassification(transformers.BertConfig(**config, num_labels=3))
        lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=targets.split(","))
    else:
        config = _gpt2()
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
        lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets.split(","), fan_in_fan_out=True)
    path = _config_file(tmp_path, config)
    wrapped = peft.get_peft_model(hf, lora)
    trainable, _ = wrapped.get_nb_trainable_parameters()
    plan = plan_memory(path, task, 2, 16, lora_r=4, num_labels=3 if family == "bert" else None)
    assert plan.gradients == 4 * trainable
    # one step per trainable tensor; GPT-2's c_attn B is one tensor in peft and three parts here (models/lora.py)
    tensors = sum(p.requires_grad for p in wrapped.parameters()) + (2 * config["n_layer"] if family == "gpt2" else 0)
    assert plan.optimizer == 8 * trainable + 4 * tensors
    full = plan_memory(path, task, 2, 16, num_labels=3 if family == "bert" else None)
    lora_params = 4 * sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert plan.parameters == full.parameters + lora_params


def test_largest_batch_is_the_boundary(tmp_path):
    path = _config_file(tmp_path, _gpt2())
    settings = {"model": path, "task": "causal-lm", "max_length": 64}
    capacity = plan_memory(batch_size=37, **settings).total + 1
    best = largest_batch(capacity, **settings)
    assert best == 37
    assert plan_memory(batch_size=best + 1, **settings).total > capacity
    assert largest_batch(1000, **settings) is None


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("512 mb") == 512 * 10**6
    with pytest.raises(ValueError, match="--device-memory"):
        parse_size("lots")


def test_cli_json_and_table(tmp_path):
    path = _config_file(tmp_path, _llama())
    args = ["memory", "--model", str(path), "--task", "causal-lm", "--batch-size", "4", "--max-length", "40"]
    result = CliRunner().invoke(app, [*args, "--json", "--device-memory", "5MB"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    plan = plan_memory(path, "causal-lm", 4, 40)
    assert {k: printed[k] for k in plan.as_dict()} == plan.as_dict()
    assert printed["largest_batch_size"] == largest_batch(5 * 10**6, model=path, task="causal-lm", max_length=40)
    split = CliRunner().invoke(app, [*args, "--json", "--tp", "2", "--world-size", "2", "--grad-accum-steps", "3"])
    assert split.exit_code == 0, split.output
    expected = plan_memory(path, "causal-lm", 4, 40, world_size=2, tp=2, grad_accum_steps=3).as_dict()
    assert {k: json.loads(split.output)[k] for k in expected} == expected != plan.as_dict()
    table = CliRunner().invoke(app, [*args, "--checkpointing"])
    assert table.exit_code == 0, table.output
    assert "activations" in table.output and "total" in table.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "fp8"], "--precision"),
        (["--cpu-offload"], "needs --strategy fsdp"),
        (["--lora-targets", "nope", "--lora-r", "4"], "--lora-targets"),
        (["--max-length", "4096"], "learned positions"),
        (["--tp", "3", "--world-size", "3"], "does not divide"),
        (["--tp", "2", "--world-size", "3"], "tensor-parallel groups"),
        (["--tp", "2", "--world-size", "4"], "use strategy fsdp"),
        (["--tp", "2", "--world-size", "2", "--lora-r", "4"], "LoRA"),
        (["--grad-accum-steps", "0"], "grad_accum_steps"),
    ],
)
def test_cli_user_errors(tmp_path, extra, message):
    path = _config_file(tmp_path, _gpt2())
    args = ["memory", "--model", str(path), "--task", "causal-lm", "--batch-size", "2", "--max-length", "16", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def _probe(tmp_path, config: dict, mode: str) -> dict[str, int]:
    """Rank 0's bytes after one step on 2 gloo processes (tests/training/memory_probe.py)."""
    from tests.training.test_distributed import _free_port, _start, _wait

    path, out = _config_file(tmp_path, config), tmp_path / "measured.json"
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    with open(tmp_path / "probe.log", "w+b") as log:
        code = _wait(_start([*torchrun, "-m", "tests.training.memory_probe", str(path), str(out), mode], log), 300)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.distributed
def test_fsdp_counts_equal_fully_shard_on_two_processes(tmp_path):
    """Rank 0's bytes of parameters, gradients and AdamW state under FSDP2's ``fully_shard`` (2 gloo processes)."""
    measured = _probe(tmp_path, _gpt2(), "fsdp")  # vocabulary 99: an odd first dimension, padded on the last rank
    plan = plan_memory(tmp_path / "config.json", "causal-lm", 2, 16, strategy="fsdp", world_size=2)
    assert {k: getattr(plan, k) for k in measured} == measured


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tp_counts_equal_the_trainers_split_on_two_processes(tmp_path, family):
    """Rank 0's bytes under the Trainer's ``--tp 2`` split: GPT-2's column-parallel biases split, its row-parallel
    ones whole; Llama's grouped key/value heads and SwiGLU gate; the (tied) token table split by rows, 50 of 99."""
    measured = _probe(tmp_path, _gpt2() if family == "gpt2" else _llama(), "tp")
    plan = plan_memory(tmp_path / "config.json", "causal-lm", 2, 16, world_size=2, tp=2)
    assert {k: getattr(plan, k) for k in measured} == measured
    whole = plan_memory(tmp_path / "config.json", "causal-lm", 2, 16)
    assert plan.parameters < whole.parameters  # the split is there to see


def test_tp_splits_heads_and_mlp_width(tmp_path):
    """Per process under tp 2: half of the projections' weights, rank 0's 50 of the 99 rows of the tied token table,
    the norms whole (counted by hand from the config), fewer activations (half the heads and feed-forward width, the
    residual stream whole)."""
    config = _llama()  # hidden 48, 3 layers, 4 heads of 12 (2 key/value heads), SwiGLU 128, vocabulary 99, tied
    path = _config_file(tmp_path, config)
    C, F, L, V, kv = 48, 128, 3, 99, 24
    projections = C * C + 2 * C * kv + C * C + 3 * C * F
    norms = 2 * C * L + C
    plan = plan_memory(path, "causal-lm", 4, 40, world_size=2, tp=2, device="cpu")
    assert plan.parameters == 4 * ((V + 1) // 2 * C + norms + L * projections // 2)
    whole = plan_memory(path, "causal-lm", 4, 40, device="cpu")
    assert whole.activations / 2 < plan.activations < whole.activations
    sharded = plan_memory(path, "causal-lm", 4, 40, world_size=4, tp=2, strategy="fsdp", device="cpu")
    assert sharded.parameters < plan.parameters  # FSDP shards the tensor-parallel parts over the 2 replicas
