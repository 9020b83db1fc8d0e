"""LoRA: only the adapters (and the new head) train; the saved adapter is PEFT's, which ``peft`` loads onto the
``transformers`` model with equal outputs; bunmyaku loads it back; merged == unmerged; bad targets are refused.

Oracles: ``peft`` + ``transformers`` for the outputs, the adapter key names written out by hand from PEFT's format
(``base_model.model.<transformers module>.lora_A.weight``), and parameter names for what may change.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.models import lora
from bunmyaku.tasks.finetune import load_finetuned
from bunmyaku.training import Plugin
from tests.conftest import require_module
from tests.finetune.helpers import save_tiny, sentiment_rows
from tests.parity.helpers import assert_close, randomize

transformers = require_module("transformers", "the oracle for LoRA adapters")
peft = require_module("peft", "the oracle for LoRA adapters (the lora extra)")

runner = CliRunner()
LORA = {"lora_r": 4, "lora_alpha": 8.0, "lora_targets": "query,value"}
RUN = {"epochs": 3, "batch_size": 4, "max_length": 32, "lr": 1e-2, "warmup_ratio": 0.0, "warmup_steps": 0, "seed": 0}
QUIET = {"progress": False, "plot": False, "device": "cpu", "log_every": 1000}


class Snapshot(Plugin):
    """Copies every parameter when training starts (after LoRA is applied), to compare with the end."""

    def on_fit_start(self, trainer) -> None:
        self.start = {n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters()}


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("lora-bert"), "bert")


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, bert_base):
    """A LoRA fine-tuning run on BERT (query, value): its result and the parameters at the start of training."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    rows = [{"text": t, "label": lab} for t, lab in sentiment_rows(16)]
    snapshot = Snapshot()
    result = bunmyaku.finetune(
        task="text-classification",
        model=str(bert_base),
        train=rows,
        eval=rows[:8],
        output_dir=str(out),
        callbacks=[snapshot],
        **LORA,
        **RUN,
        **QUIET,
    )
    return out, result, snapshot.start


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_only_the_adapters_and_the_new_head_train(bert_run):
    _, result, start = bert_run
    end = dict(result.model.named_parameters())
    assert set(start) == set(end)
    changed = {n for n in start if not torch.equal(start[n], end[n])}
    may_train = {n for n in start if ".lora_A." in n or ".lora_B." in n or n.startswith("head.classifier.")}
    # every adapter of both layers on query and value, and the classifier: 2 layers x 2 targets x (A, B) + 2
    assert len(may_train) == 2 * 2 * 2 + 2
    assert changed == may_train
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == may_train


def test_the_run_folder_is_a_peft_adapter(bert_run, bert_base):
    out, _, _ = bert_run
    model_dir = out / "model"
    assert not (model_dir / "model.safetensors").exists() and not (model_dir / "config.json").exists()
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(bert_base.resolve())
    assert config["task_type"] == "SEQ_CLS"
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    keys = set(load_file(model_dir / "adapter_model.safetensors"))
    expected = {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("query", "value")
        for ab in "AB"
    }
    expected |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert keys == expected
    card = (model_dir / "README.md").read_text()
    assert "- lora_r: 4" in card and "LoRA adapter in PEFT's format" in card


def test_peft_and_transformers_load_the_adapter_with_equal_outputs(bert_run, bert_base):
    out, result, _ = bert_run
    batch = _batch(result.model.config.vocab_size)
    with torch.no_grad():
        ours = result.model(**batch).logits
        base = transformers.AutoModelForSequenceClassification.from_pretrained(bert_base, num_labels=2)
        theirs = peft.PeftModel.from_pretrained(base, out / "model").eval()
        assert_close(theirs(**batch).logits, ours)
        with theirs.disable_adapter():  # the adapters themselves matter, not the head alone
            assert (theirs(**batch).logits - ours).abs().max() > 1e-3
        # transformers' own PEFT integration reads the folder as an adapter too (base from adapter_config.json)
        direct = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model", num_labels=2)
        assert_close(direct.eval()(**batch).logits, ours)


def test_bunmyaku_loads_the_adapter_folder(bert_run):
    out, result, _ = bert_run
    batch = _batch(result.model.config.vocab_size)
    loaded = bunmyaku.from_pretrained(out / "model")
    assert lora.has_lora(loaded)
    assert loaded.config.id2label == result.model.config.id2label
    with torch.no_grad():
        assert_close(loaded(**batch).logits, result.model(**batch).logits)
    task, finetuned, _ = load_finetuned(out, device="cpu")  # what predict / evaluate load
    assert lora.has_lora(finetuned) and task.label_names() == list(result.model.config.id2label.values())
    with torch.no_grad():
        assert_close(finetuned(**batch).logits, result.model(**batch).logits)


def test_init_from_an_adapter_asks_for_a_merge(bert_run, tmp_path):
    out, _, _ = bert_run
    with pytest.raises(ValueError, match="is a LoRA adapter, not a whole model: merge it first"):
        rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
        bunmyaku.finetune(init_from=str(out), train=rows, eval=rows, output_dir=str(tmp_path), **QUIET)


def test_merge_lora_writes_a_plain_folder_with_equal_outputs(bert_run, bert_base, tmp_path):
    out, result, _ = bert_run
    batch = _batch(result.model.config.vocab_size)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(bert_base, num_labels=2)
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(base, out / "model").eval()(**batch).logits
    cli = runner.invoke(app, ["merge-lora", str(out / "model"), "--output-dir", str(tmp_path / "merged")])
    assert cli.exit_code == 0, cli.output
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.id2label == result.model.config.id2label
    with torch.no_grad():
        assert_close(plain(**batch).logits, expected)
    assert lora.has_lora(result.model)  # merging a folder leaves the run's model as it was


def test_finetune_command_with_lora_merge(bert_base, tmp_path):
    """The flags on the command line; --lora-merge writes DIR/merged, the run's adapter merged."""
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{t}\t{lab}\n" for t, lab in sentiment_rows(8)))
    flags = ["--model", str(bert_base), "--train", str(train), "--eval", str(train), "--text-column", "0"]
    flags += ["--label-column", "1", "--epochs", "1", "--batch-size", "4", "--max-length", "32", "--lr", "0.01"]
    flags += ["--warmup-steps", "0", "--lora-r", "2", "--lora-alpha", "4", "--lora-targets", "query,key,dense"]
    flags += ["--lora-merge", "--no-progress", "--no-plot", "--device", "cpu", "--output-dir", str(tmp_path / "run")]
    cli = runner.invoke(app, ["finetune", *flags])
    assert cli.exit_code == 0, cli.output
    config = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["dense", "key", "query"]
    batch = _batch(40)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(bert_base, num_labels=2)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "merged").eval()
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "model").eval()(**batch).logits
        assert_close(merged(**batch).logits, expected)
    assert "LoRA adapter" not in (tmp_path / "run" / "merged" / "README.md").read_text()  # a plain model there
    scores = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "run"), "--eval", str(train)])
    assert scores.exit_code == 0, scores.output


def _hf_decoder(kind: str):
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
        return transformers.GPT2LMHeadModel(config), ["c_attn", "c_fc"]
    config = transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config), ["q_proj", "v_proj"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_adapter_matches_peft_merged_and_generating(kind, tmp_path):
    """GPT-2's c_attn is one fused module in transformers and three linears here (see bunmyaku.models.lora)."""
    hf, targets = _hf_decoder(kind)
    randomize(hf, seed=0)
    hf.save_pretrained(tmp_path / "base")
    ours = bunmyaku.from_pretrained(tmp_path / "base", task="causal-lm")
    lora.add_lora(ours, r=4, alpha=8.0, targets=targets)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: B is zero at the start
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    lora.save_adapter(ours, tmp_path / "adapter", str(tmp_path / "base"))
    assert not any(".lm_head" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    if kind == "gpt2":  # PEFT's c_attn adapter: one A (r, C) and one B (3C, r)
        saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        assert saved["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
        assert saved["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    batch = _batch(99)
    with torch.no_grad():
        expected = theirs(**batch).logits
        assert_close(ours.eval()(**batch).logits, expected, mask=batch["attention_mask"])
        with theirs.disable_adapter():
            assert (theirs(**batch).logits - expected).abs().max() > 1e-3
        prompt = batch["input_ids"][:1, :5]
        want = theirs.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert ours.generate(prompt, max_new_tokens=6).tolist() == want.tolist()  # KV-cache steps keep LoRA
        lora.merge_lora(ours)
        assert not any("lora" in n for n, _ in ours.named_parameters())
        assert_close(ours(**batch).logits, expected, mask=batch["attention_mask"])
    lora.merge_adapter_dir(tmp_path / "adapter", tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(plain(**batch).logits, expected, mask=batch["attention_mask"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bunmyaku_loads_an_adapter_peft_wrote(kind, tmp_path):
    """The other direction: an adapter trained with peft on the transformers model, loaded by bunmyaku."""
    hf, targets = _hf_decoder(kind)
    randomize(hf, seed=0)
    hf.save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = bunmyaku.from_pretrained(tmp_path / "adapter")
    batch = _batch(99)
    with torch.no_grad():
        assert_close(ours(**batch).logits, theirs.eval()(**batch).logits, mask=batch["attention_mask"])


def test_bad_targets_name_the_valid_ones(bert_base):
    model = bunmyaku.from_pretrained(bert_base, task="sequence-classification", num_labels=2)
    with pytest.raises(ValueError, match="q_proj: not a linear layer of BertForSequenceClassification") as error:
        lora.add_lora(model, r=4, alpha=8.0, targets=["query", "q_proj"])
    assert str(error.value).endswith("for this architecture: dense, key, query, value")
    assert not lora.has_lora(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="lora_targets"):
        bunmyaku.finetune(model=str(bert_base), train=[{"text": "a", "label": "x"}], lora_r=4, **QUIET)


def test_merge_lora_refuses_a_plain_folder(bert_base, tmp_path):
    result = runner.invoke(app, ["merge-lora", str(bert_base), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "adapter_config.json" in result.output
    assert not (tmp_path / "out").exists()


def test_lora_flags_exist_on_finetune_and_cv():
    for verb in ("finetune", "cv"):
        shown = runner.invoke(app, [verb, "--help"], terminal_width=200).output
        for flag in ("--lora-r", "--lora-alpha", "--lora-targets", "--lora-dropout", "--lora-merge"):
            assert flag in shown, (verb, flag)


def test_adapters_on_longformer_global_projections(tmp_path):
    """Longformer's global rows can skip projecting every token by key_global / value_global (reading their weights);
    with adapters on those projections the adapters must count, as peft's do on the transformers model."""
    config = transformers.LongformerConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        attention_window=[4, 8],
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=2,
    )
    hf = transformers.LongformerForSequenceClassification(config)  # global attention on <s>: 1 global row < head_dim
    randomize(hf, seed=0)
    hf.save_pretrained(tmp_path / "base")
    ours = bunmyaku.from_pretrained(tmp_path / "base")
    lora.add_lora(ours, r=4, alpha=8.0, targets=["key_global", "value_global"])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    lora.save_adapter(ours, tmp_path / "adapter", str(tmp_path / "base"))
    theirs = peft.PeftModel.from_pretrained(
        transformers.LongformerForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    batch = _batch(99)
    batch["input_ids"][:, 0] = 0
    with torch.no_grad():
        expected = theirs(**batch).logits
        assert_close(ours.eval()(**batch).logits, expected)
        with theirs.disable_adapter():
            assert (theirs(**batch).logits - expected).abs().max() > 1e-3
