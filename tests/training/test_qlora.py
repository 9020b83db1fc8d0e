"""QLoRA: LoRA on a base whose linear weights bitsandbytes stores in nf4 or int8 (bunmyaku.models.quantize).

Oracles: bitsandbytes' own dequantization (the float model with each weight replaced by its dequantized value),
``transformers`` loading the same base with ``BitsAndBytesConfig`` plus ``peft`` loading our adapter, the byte
counts of the tensors bitsandbytes holds, and parameter names for what may change.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.models import lora, quantize
from bunmyaku.models.bert import BertConfig, BertModel
from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel
from bunmyaku.models.llama import LlamaConfig, LlamaForCausalLM
from bunmyaku.tasks.finetune import load_finetuned
from tests.conftest import require_module
from tests.finetune.helpers import save_tiny, sentiment_rows
from tests.parity.helpers import assert_close, randomize
from tests.training.test_lora import Snapshot

bnb = require_module("bitsandbytes", "QLoRA's quantized layers (the qlora extra)")
transformers = require_module("transformers", "the oracle for quantized adapters")
peft = require_module("peft", "the oracle for LoRA adapters (the lora extra)")

runner = CliRunner()
QUIET = {"progress": False, "plot": False, "device": "cpu", "log_every": 1000}
# nf4 quantizes in blocks of 64 along the input: the tiny models here are 64 wide (real ones are multiples of 64)
WIDTH = 64


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(vocab_size=99, hidden_size=WIDTH, intermediate_size=128, num_layers=2, num_heads=4)
        model = BertModel.from_config(config)
    elif kind == "gpt2":
        model = GPT2LMHeadModel.from_config(GPT2Config(vocab_size=99, hidden_size=WIDTH, num_layers=2, num_heads=4))
    else:
        config = LlamaConfig(
            vocab_size=99, hidden_size=WIDTH, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
        )
        model = LlamaForCausalLM.from_config(config)
    randomize(model, seed=0)
    return model.eval()


def _batch(vocab: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """The float weight a bitsandbytes layer computes with, by bitsandbytes' own functions."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return weight.data.float() * scales[:, None] / 127


def _out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_a_quantized_model_computes_with_the_dequantized_weights(kind, scheme):
    model = _tiny(kind)
    float_out = _out(model, _batch()).detach()
    quantized = quantize.quantize_base(copy.deepcopy(model), scheme)
    base = lora.base_linears(quantized)
    assert base and all(type(quantized.get_submodule(n)).__module__.startswith("bitsandbytes") for n in base)
    assert quantize.is_quantized(quantized) == scheme
    reference = copy.deepcopy(model)  # the float model with bitsandbytes' dequantized weights
    with torch.no_grad():
        for name in base:
            reference.get_submodule(name).weight.copy_(_dequantized(quantized.get_submodule(name)))
        got, want = _out(quantized, _batch()), _out(reference, _batch())
    assert_close(got, want, atol=2e-5)
    assert (got - float_out).abs().max() > 1e-4  # the weights really were rounded
    if kind != "bert":  # a language model's tied vocabulary projection stays float; generation (KV cache) works
        assert quantized.get_output_embeddings().weight.dtype == torch.float32
        prompt = _batch()["input_ids"][:2, :4]
        assert (
            quantized.generate(prompt, max_new_tokens=6).tolist()
            == reference.generate(prompt, max_new_tokens=6).tolist()
        )


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_quantized_bytes_are_what_bitsandbytes_holds(scheme):
    model = quantize.quantize_base(_tiny("llama"), scheme)
    layers = [model.get_submodule(n) for n in lora.base_linears(model)]
    shapes = {(layer.out_features, layer.in_features) for layer in layers}
    assert len(shapes) >= 3  # square, wide and narrow projections
    for layer in layers:
        assert quantize.weight_bytes(layer) == quantize.quantized_bytes((layer.out_features, layer.in_features), scheme)
    big = (4096, 4096)
    per_weight = quantize.quantized_bytes(big, scheme) / (4096 * 4096)
    assert per_weight == pytest.approx(0.5 + 1 / 64 + 4 / 64 / 256, rel=1e-3) if scheme == "nf4" else 1 + 4 / 4096


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_adapters_on_a_quantized_base_equal_peft_on_transformers_quantized_model(scheme, tmp_path):
    """The same bitsandbytes quantization on both sides: our LoRA layers over it equal peft's."""
    save_tiny(tmp_path / "base", "bert")
    _tiny("bert").save_pretrained(tmp_path / "base")
    ours = bunmyaku.from_pretrained(tmp_path / "base", task="sequence-classification", num_labels=2)
    quantize.quantize_base(ours, scheme)
    lora.add_lora(ours, r=4, alpha=8.0, targets=["query", "value", "dense"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: B starts at zero
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    lora.save_adapter(ours, tmp_path / "adapter", str(tmp_path / "base"))
    settings = {"llm_int8_skip_modules": ["classifier"]}  # the new head trains in float (modules_to_save)
    if scheme == "nf4":
        settings.update(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        settings.update(bnb_4bit_compute_dtype=torch.float32)
    else:
        settings.update(load_in_8bit=True)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base",
        num_labels=2,
        quantization_config=transformers.BitsAndBytesConfig(**settings),
        device_map="cpu",
    )
    for module in base.modules():  # as quantize_base keeps bitsandbytes' repacking CPU inference kernel off
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = _batch()
    with torch.no_grad():
        expected = theirs(**batch).logits
        assert_close(ours.eval()(**batch).logits, expected, atol=1e-5)
        reloaded = bunmyaku.from_pretrained(tmp_path / "adapter")  # quantized again, as the record says
        assert quantize.is_quantized(reloaded) == scheme
        assert torch.equal(reloaded(**batch).logits, ours(**batch).logits)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A QLoRA fine-tuning run (nf4) on a 64-wide BERT, with --lora-merge."""
    base = save_tiny(tmp_path_factory.mktemp("qlora-base"), "bert")
    _tiny("bert").save_pretrained(base)
    out = tmp_path_factory.mktemp("qlora-run") / "run"
    rows = [{"text": t, "label": lab} for t, lab in sentiment_rows(16)]
    snapshot = Snapshot()
    result = bunmyaku.finetune(
        task="text-classification",
        model=str(base),
        train=rows,
        eval=rows[:8],
        output_dir=str(out),
        callbacks=[snapshot],
        lora_r=4,
        lora_alpha=8.0,
        lora_targets="query,value",
        lora_quantize="nf4",
        lora_merge=True,
        epochs=3,
        batch_size=4,
        max_length=32,
        lr=1e-2,
        warmup_steps=0,
        seed=0,
        **QUIET,
    )
    return base, out, result, snapshot.start


def test_a_qlora_run_trains_only_the_adapters_and_the_head(qlora_run):
    _, _, result, start = qlora_run
    end = dict(result.model.named_parameters())
    changed = {n for n in start if not torch.equal(start[n], end[n])}
    may_train = {n for n in start if ".lora_A." in n or ".lora_B." in n or n.startswith("head.classifier.")}
    assert changed == may_train and len(may_train) == 2 * 2 * 2 + 2
    frozen = [n for n, p in end.items() if p.dtype == torch.uint8]  # the packed 4-bit weights, unchanged
    assert len(frozen) == 2 * 6 + 1  # q, k, v, out, the MLP's two per layer, the pooler
    assert all(not end[n].requires_grad for n in frozen)
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_a_qlora_run_folder_reloads_quantized_and_merges_onto_the_float_base(qlora_run):
    base, out, result, _ = qlora_run
    record = json.loads((out / "model" / lora.MODEL_CONFIG).read_text())
    assert record["quantization_config"] == quantize.quantization_config("nf4")
    assert "lora_quantize: nf4" in (out / "model" / "README.md").read_text()
    batch = _batch()
    with torch.no_grad():
        ours = result.model(**batch).logits
        _, again, _ = load_finetuned(out, device="cpu")  # what predict / evaluate load
        assert quantize.is_quantized(again) == "nf4"
        assert torch.equal(again(**batch).logits, ours)
        # merged/ holds the adapters folded into the float base: what peft gives on the unquantized model
        float_base = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        expected = peft.PeftModel.from_pretrained(float_base, out / "model").eval()(**batch).logits
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
        assert_close(merged(**batch).logits, expected)
        assert (expected - ours).abs().max() < 0.1  # the float base differs from the 4-bit one by rounding only
    assert lora.has_lora(result.model) and quantize.is_quantized(result.model)  # the run's model stays as trained


def test_bad_qlora_settings_are_refused(qlora_run, monkeypatch):
    base, _, result, _ = qlora_run
    rows = [{"text": "good", "label": "pos"}]
    with pytest.raises(ValueError, match="lora_quantize 'fp4': expected one of nf4, int8"):
        bunmyaku.finetune(model=str(base), train=rows, lora_r=4, lora_targets="query", lora_quantize="fp4", **QUIET)
    with pytest.raises(ValueError, match="give lora_r"):
        bunmyaku.finetune(model=str(base), train=rows, lora_quantize="nf4", **QUIET)
    with pytest.raises(ValueError, match="merge its saved adapter folder"):
        lora.merge_lora(result.model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize_base(result.model, "int8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'bunmyaku\[qlora\]'"):
        quantize.quantize_base(_tiny("bert"), "nf4")


def test_lora_quantize_on_the_command_line(qlora_run, tmp_path):
    base, _, _, _ = qlora_run
    for verb in ("finetune", "cv"):
        assert "--lora-quantize" in runner.invoke(app, [verb, "--help"], terminal_width=200).output
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{t}\t{lab}\n" for t, lab in sentiment_rows(8)))
    flags = ["--model", str(base), "--train", str(train), "--text-column", "0", "--label-column", "1"]
    flags += ["--lora-r", "2", "--lora-targets", "query", "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    bad = runner.invoke(app, ["finetune", *flags, "--lora-quantize", "int4"])
    assert bad.exit_code == 1 and "lora_quantize 'int4'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    planned = runner.invoke(
        app,
        ["memory", "--model", str(base), "--task", "sequence-classification", "--batch-size", "2"]
        + ["--max-length", "16", "--lora-r", "4", "--lora-quantize", "nf4", "--device", "cpu", "--json"],
    )
    assert planned.exit_code == 0, planned.output
    plain = runner.invoke(
        app,
        ["memory", "--model", str(base), "--task", "sequence-classification", "--batch-size", "2"]
        + ["--max-length", "16", "--lora-r", "4", "--device", "cpu", "--json"],
    )
    assert json.loads(planned.output)["parameters"] < json.loads(plain.output)["parameters"]


@pytest.mark.distributed
def test_qlora_under_ddp_matches_one_process(tmp_path):
    """2 gloo processes with half the batch train the adapters of 1 process with the whole batch (no dropout)."""
    from tests.training.test_distributed import _free_port, _start, _wait

    base = save_tiny(tmp_path / "base", "bert")
    config = BertConfig(vocab_size=40, hidden_size=WIDTH, intermediate_size=128, num_layers=2, num_heads=4, dropout=0.0)
    config.attention_dropout = 0.0
    BertModel.from_config(config).save_pretrained(base)
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{t}\t{lab}\n" for t, lab in sentiment_rows(32)))
    flags = ["-m", "bunmyaku", "finetune", "--task", "text-classification", "--model", str(base), "--train"]
    flags += [str(train), "--eval", str(train), "--text-column", "0", "--label-column", "1", "--lora-r", "4"]
    flags += ["--lora-targets", "query,value", "--lora-quantize", "nf4", "--epochs", "2", "--max-length", "32"]
    flags += ["--lr", "0.01", "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--no-plot"]
    single = _start([*flags, "--batch-size", "8", "--output-dir", str(tmp_path / "single")])
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    with open(tmp_path / "ddp.log", "w+b") as log:
        checked = ["-m", "tests.training.cli_checked", *flags[2:], "--batch-size", "4"]  # no group outlives it
        code = _wait(_start([*torchrun, *checked, "--output-dir", str(tmp_path / "ddp")], log), 150)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-3000:]
    assert _wait(single, 150) == 0
    got = load_file(tmp_path / "ddp" / "model" / "adapter_model.safetensors")
    want = load_file(tmp_path / "single" / "model" / "adapter_model.safetensors")
    start = torch.zeros_like(want["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"])
    assert not torch.equal(want["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"], start)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_qlora_on_cuda_computes_with_the_dequantized_weights_and_trains(scheme):
    model = _tiny("llama").cuda()
    quantized = quantize.quantize_base(copy.deepcopy(model), scheme)
    reference = copy.deepcopy(model)
    batch = {k: v.cuda() for k, v in _batch().items()}
    with torch.no_grad():
        for name in lora.base_linears(quantized):
            reference.get_submodule(name).weight.copy_(_dequantized(quantized.get_submodule(name)))
        got, want = _out(quantized, batch).cpu(), _out(reference, batch).cpu()
    # CUDA's int8 product also rounds the inputs to int8 (per row): a bound relative to the outputs there
    assert (got - want).abs().max() <= (1e-3 if scheme == "nf4" else 0.05 * float(want.abs().max()))
    lora.add_lora(quantized, r=4, alpha=8.0, targets=["q_proj", "v_proj"])
    quantized.train()
    loss = quantized(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in quantized.named_parameters() if ".lora_A." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_an_unknown_quantization_record_names_its_file(qlora_run, tmp_path):
    import shutil

    _, out, _, _ = qlora_run
    folder = shutil.copytree(out / "model", tmp_path / "model")
    record = json.loads((folder / lora.MODEL_CONFIG).read_text())
    record["quantization_config"] = {"quant_method": "gptq"}
    (folder / lora.MODEL_CONFIG).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"bunmyaku_config.json: quantization_config .*gptq.* nf4 .* or int8"):
        lora.load_adapter(folder)
