"""Replaced token detection with gradient-disentangled embedding sharing (ELECTRA, DeBERTa-v3 section 3).

Oracles: labels and corrupted ids computed in the test by a loop over positions; the loss recomputed from the two
models' own forwards with torch's mean-reduced losses; gradients read from autograd; the export compared with
``transformers``' own models.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import bunmyaku
from bunmyaku.cli import app
from bunmyaku.models.bert import BertConfig
from bunmyaku.models.roberta import RobertaConfig
from bunmyaku.training.objectives import ReplacedTokenDetection as RTDLoss
from bunmyaku.training.rtd import ReplacedTokenDetection, merged_discriminator

TINY = {"vocab_size": 99, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 37}
MASK_ID = 4


def _model(kind: str = "bert", sharing: str = "gdes", seed: int = 0) -> ReplacedTokenDetection:
    torch.manual_seed(seed)
    config = (BertConfig if kind == "bert" else RobertaConfig)(**TINY, max_seq_len=40)
    return ReplacedTokenDetection.from_config(config, generator_layers=1, embedding_sharing=sharing)


def _batch(pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of 10, the second padded after 7 tokens; five masked positions, one holding token 7."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 99, (3, 10), generator=generator)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 7:] = 0
    ids[1, 7:] = pad_id
    ids[0, 4] = 7
    labels = torch.full_like(ids, -100)
    for row, col in [(0, 1), (0, 4), (1, 2), (1, 5), (2, 3)]:
        labels[row, col] = ids[row, col]
    masked_input = torch.where(labels != -100, MASK_ID, ids)
    return {"input_ids": masked_input, "attention_mask": attention_mask, "labels": labels, "original": ids}


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "original"}


def _force_generator(model: ReplacedTokenDetection, token: int, also: int | None = None) -> None:
    """Make the generator put (almost) all its probability on ``token`` (and a bit more still on ``also``)."""
    with torch.no_grad():
        bias = model.generator.head.mlm.bias
        bias.zero_()
        bias[token] = 1e4
        if also is not None:
            bias[also] = 1e4 + 10.0


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_rtd_labels_equal_an_independent_computation(kind):
    model = _model(kind).eval()
    pad_id = model.config.pad_token_id
    batch = _batch(pad_id)
    # every sample is 7, and the padding id, although the likelier, is never sampled
    _force_generator(model, 7, also=pad_id)
    out = model(**_inputs(batch))
    original, labels, mask = batch["original"], batch["labels"], batch["attention_mask"]
    expected_ids, expected_labels = original.clone(), []
    for row in range(3):
        for col in range(10):
            masked = labels[row, col] != -100
            if masked:
                expected_ids[row, col] = 7
            if mask[row, col]:  # a sample equal to the original (row 0, col 4) is no replacement
                expected_labels.append(float(masked and original[row, col] != 7))
    assert torch.equal(out.corrupted_ids, expected_ids)
    assert out.rtd_labels.tolist() == expected_labels and sum(expected_labels) == 4
    assert out.rtd_logits.shape == (int(mask.sum()),)
    assert out.mlm_labels.tolist() == original[labels != -100].tolist()


def test_samples_follow_the_generator_softmax():
    """Temperature 1: the frequencies of 4000 draws at one position match softmax(logits) (chi-square)."""
    model = _model().eval()
    with torch.no_grad():
        model.generator.head.mlm.bias.zero_()
        model.generator.head.mlm.bias[10:14] = torch.tensor([30.0, 30.0 + 1.0, 30.0 + 2.0, 30.0 - 1.0])
    ids = torch.tensor([[2, MASK_ID, 9, 3]]).repeat(4000, 1)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = 20
    torch.manual_seed(3)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        probs = F.softmax(model.generator(input_ids=ids[:1]).logits[0, 1], -1)
    counts = Counter(out.corrupted_ids[:, 1].tolist())
    expected = probs[10:14] / probs[10:14].sum() * 4000
    assert set(counts) <= set(range(10, 14)) and probs[10:14].sum() > 0.999
    chi2 = sum((counts.get(10 + i, 0) - e) ** 2 / e for i, e in enumerate(expected.tolist()))
    assert chi2 < 16.3  # p = 0.001 with 3 degrees of freedom


def _term_grads(model, batch, term: str) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    losses, _ = RTDLoss(rtd_weight=1e6)(model, _inputs(batch))
    losses[term].backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _nonzero(grad) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def test_gdes_keeps_the_rtd_loss_out_of_the_generator_embeddings():
    model = _model("bert", "gdes")
    batch = _batch()
    delta_names = [f"discriminator.embed.{t}.parametrizations.weight.original" for t in ("tokens", "positions")]
    generator_names = [f"generator.backbone.embed.{t}.weight" for t in ("tokens", "positions", "segments")]
    # E_D = E_G + E_delta, E_delta starting at zero
    tokens = model.discriminator.embed.tokens
    assert torch.equal(tokens.weight, model.generator.backbone.embed.tokens.weight)
    assert not tokens.parametrizations.weight.original.any()
    rtd = _term_grads(model, batch, "rtd")  # the RTD loss alone, weighted by a huge lambda
    assert all(not _nonzero(rtd[name]) for name in generator_names)
    assert all(_nonzero(rtd[name]) for name in delta_names)
    assert _nonzero(rtd["generator.backbone.layers.0.attn.q_proj.weight"]) is False
    mlm = _term_grads(model, batch, "lm")  # the MLM loss alone reaches E_G and not E_delta
    assert all(_nonzero(mlm[name]) for name in generator_names[:2])
    assert all(not _nonzero(mlm[name]) for name in delta_names)
    with torch.no_grad():  # the discriminator reads E_G + E_delta
        tokens.parametrizations.weight.original.normal_()
        expected = model.generator.backbone.embed.tokens.weight + tokens.parametrizations.weight.original
    torch.testing.assert_close(tokens.weight, expected, rtol=0, atol=0)


def test_es_sends_both_losses_into_the_one_table_and_none_shares_nothing():
    model = _model("bert", "es")
    assert model.discriminator.embed.tokens.weight is model.generator.backbone.embed.tokens.weight
    table = "generator.backbone.embed.tokens.weight"
    assert _nonzero(_term_grads(model, _batch(), "rtd")[table])
    assert _nonzero(_term_grads(model, _batch(), "lm")[table])
    separate = _model("bert", "none")
    assert separate.shared == []
    grads = _term_grads(separate, _batch(), "rtd")
    assert not _nonzero(grads[table]) and _nonzero(grads["discriminator.embed.tokens.weight"])


@pytest.mark.parametrize("sharing", ["gdes", "es"])
def test_the_loss_is_mlm_plus_lambda_rtd_from_the_two_models_outputs(sharing):
    model = _model("bert", sharing).eval()  # no dropout: the models' own forwards below see the same numbers
    batch = _batch()
    objective = RTDLoss(rtd_weight=7.0)
    torch.manual_seed(5)
    losses, metrics = objective(model, _inputs(batch))
    counts = objective.count(_inputs(batch))
    total = sum(losses[t] / counts[t] for t in losses)  # the Trainer's normalisation
    torch.manual_seed(5)
    corrupted = model(**_inputs(batch)).corrupted_ids
    with torch.no_grad():
        logits = model.generator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mlm = F.cross_entropy(logits.reshape(-1, 99), batch["labels"].reshape(-1), ignore_index=-100)
        hidden = model.discriminator(input_ids=corrupted, attention_mask=batch["attention_mask"]).last_hidden_state
        head = model.head
        scores = F.linear(F.gelu(F.linear(hidden, head.dense.weight, head.dense.bias)), head.out_proj.weight)
        scores = scores[..., 0] + head.out_proj.bias
        real = batch["attention_mask"].bool()
        replaced = (corrupted != batch["original"]).float()
        rtd = F.binary_cross_entropy_with_logits(scores[real], replaced[real])
    torch.testing.assert_close(total, mlm + 7.0 * rtd, rtol=1e-5, atol=1e-5)
    assert metrics["replaced_fraction_num"] == replaced[real].sum()
    assert metrics["rtd_correct"] == ((scores[real] > 0) == (replaced[real] > 0)).sum()


@pytest.mark.parametrize("sharing", ["gdes", "es"])
def test_continuing_from_an_export_starts_from_its_tables(sharing, tmp_path):
    from bunmyaku.training.rtd import export_discriminator

    model = _model("bert", "gdes")
    with torch.no_grad():
        model.discriminator.embed.tokens.parametrizations.weight.original.normal_()
    export_discriminator(model, tmp_path)
    again = ReplacedTokenDetection.from_pretrained(tmp_path, embedding_sharing=sharing)
    exported = merged_discriminator(model).embed.tokens.weight
    table = again.discriminator.embed.tokens.weight
    if sharing == "gdes":  # E_delta = E_D - E_G: the discriminator reads the exported table
        torch.testing.assert_close(table, exported, rtol=0, atol=1e-6)
    else:  # one table: the generator's
        assert torch.equal(table, model.generator.backbone.embed.tokens.weight)
    query = again.generator.backbone.layers[0].attn.q_proj.weight
    assert torch.equal(query, model.generator.backbone.layers[0].attn.q_proj.weight)
    with pytest.raises(FileNotFoundError, match="generator"):
        ReplacedTokenDetection.from_pretrained(tmp_path / "generator")


def test_the_merged_discriminator_holds_e_g_plus_delta():
    model = _model("bert", "gdes")
    with torch.no_grad():
        model.discriminator.embed.positions.parametrizations.weight.original.normal_()
    merged = merged_discriminator(model)
    expected = model.generator.backbone.embed.positions.weight + model.discriminator.embed.positions.weight
    expected = expected - model.generator.backbone.embed.positions.weight  # E_D itself
    assert type(merged.embed.positions) is torch.nn.Embedding
    torch.testing.assert_close(merged.embed.positions.weight, expected, rtol=0, atol=1e-7)
    assert not torch.equal(merged.embed.positions.weight, model.generator.backbone.embed.positions.weight)
    # the original keeps training: its parametrization survives the copy
    assert hasattr(model.discriminator.embed.positions, "parametrizations")


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def botchan(shared_data, tmp_path_factory):
    """300 lines of Botchan and a WordPiece vocabulary of their 150 commonest words."""
    root = tmp_path_factory.mktemp("botchan")
    lines = [line for line in (shared_data / "botchan-en" / "botchan.txt").read_text().splitlines() if line.strip()]
    text = "\n".join(lines[200:500])
    (root / "botchan.txt").write_text(text, encoding="utf-8")
    words = Counter(w for w in text.lower().replace(",", " ").replace(".", " ").split() if w.isalpha())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", *(w for w, _ in words.most_common(150))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "max_position_embeddings": 32,
    }
    (root / "bert.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def _options(botchan, out, **extra) -> list[str]:
    options = {
        "objective": "rtd",
        "model_config": botchan / "bert.json",
        "tokenizer": botchan / "vocab.txt",
        "data": botchan / "botchan.txt",
        "doc_split": "line",
        "output_dir": out,
        "block_size": 24,
        "batch_size": 4,
        "max_steps": 4,
        "eval_every": 0,
        "device": "cpu",
        "seed": 0,
        **extra,
    }
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [*args, "--no-progress", "--no-plot"]


def test_pretrain_rtd_exports_a_discriminator_transformers_loads(botchan, tmp_path):
    import transformers

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", *_options(botchan, out, generator_layers=1, log_every=1)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["num_hidden_layers"] == 2
    assert json.loads((out / "generator" / "config.json").read_text())["num_hidden_layers"] == 1
    ids = bunmyaku.Tokenizer.from_pretrained(out)(["i was a teacher , and he was not .", "the school"], padding=True)
    ids = {k: torch.as_tensor(v) for k, v in ids.items()}
    real = ids["attention_mask"].bool()
    theirs = transformers.AutoModel.from_pretrained(out).eval()
    ours = bunmyaku.from_pretrained(out).eval()
    with torch.no_grad():
        expected = theirs(**ids).last_hidden_state
        got = ours(**ids).last_hidden_state
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    # the exported tables are E_G + E_delta from the last checkpoint, not the generator's alone
    last = max((out / "checkpoints").iterdir())
    state = load_file(last / "model.safetensors")
    delta = state["discriminator.embed.tokens.parametrizations.weight.original"]
    word = state["generator.backbone.embed.tokens.weight"] + delta
    assert delta.abs().sum() > 0
    torch.testing.assert_close(theirs.embeddings.word_embeddings.weight, word, rtol=0, atol=1e-6)
    generator = transformers.AutoModelForMaskedLM.from_pretrained(out / "generator").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            bunmyaku.from_pretrained(out / "generator").eval()(**ids).logits[real],
            generator(**ids).logits[real],
            rtol=1e-5,
            atol=1e-5,
        )
    # with its RTD head as transformers' ElectraForPreTraining: the checkpoint's discriminator logits
    electra = transformers.ElectraForPreTraining.from_pretrained(out / "electra").eval()
    trained = ReplacedTokenDetection.from_config(ours.config, generator_layers=1).eval()
    trained.load_state_dict(state)
    with torch.no_grad():
        expected = trained.head(trained.discriminator(**ids).last_hidden_state)
        torch.testing.assert_close(electra(**ids).logits[real], expected[real], rtol=1e-5, atol=1e-5)
    # a classifier starts from it (what `bunmyaku finetune --model RUN` loads)
    assert bunmyaku.from_pretrained(out, task="sequence-classification").config.num_layers == 2
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("eval_accuracy", "eval_rtd_accuracy", "eval_rtd_precision", "eval_rtd_recall"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert 0.0 < metrics["eval_replaced_fraction"] < 0.2 and metrics["eval_rtd_bce"] > 0
    torch.testing.assert_close(metrics["eval_rtd_loss"], 50.0 * metrics["eval_rtd_bce"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("rtd_recall" in r and "replaced_fraction" in r for r in logged if "lr" in r)


def test_pretrain_rtd_resumes_to_identical_weights(botchan, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed ends as the uninterrupted run does."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    options = {"save_every": 2, "keep_last": 3, "lr": 3e-3, "warmup_steps": 1}
    result = CliRunner().invoke(app, ["pretrain", *_options(botchan, whole, **options)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    shutil.copy(whole / "metrics.jsonl", resumed / "metrics.jsonl")
    result = bunmyaku.pretrain(  # the Python twin, with the command's defaults
        objective="rtd", model_config=botchan / "bert.json", tokenizer=botchan / "vocab.txt", doc_split="line",
        data=[botchan / "botchan.txt"], output_dir=resumed, block_size=24, batch_size=4, max_steps=4, eval_every=0,
        device="cpu", seed=0, progress=False, plot=False, **options,
    )  # fmt: skip
    assert type(result.model).__name__ == "BertModel" and "eval_rtd_accuracy" in result.metrics
    first = load_file(whole / "checkpoints" / "step-00000004" / "model.safetensors")
    second = load_file(resumed / "checkpoints" / "step-00000004" / "model.safetensors")
    start = load_file(whole / "checkpoints" / "step-00000002" / "model.safetensors")
    assert first.keys() == second.keys() and "head.out_proj.weight" in first
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["head.dense.weight"], start["head.dense.weight"])  # steps 3 and 4 did train
    assert load_file(whole / "model.safetensors").keys() == load_file(resumed / "model.safetensors").keys()


@pytest.mark.parametrize("sharing", ["gdes", "es"])
def test_a_checkpoint_round_trip_keeps_the_sharing(sharing, tmp_path):
    from bunmyaku.training import checkpoint as ckpt

    model = _model("bert", sharing)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    ckpt.save_model(model, tmp_path)
    again = _model("bert", sharing, seed=1)
    ckpt.load_model(again, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    gen, disc = again.generator.backbone.embed.tokens, again.discriminator.embed.tokens
    if sharing == "es":
        assert disc.weight is gen.weight
    else:
        torch.testing.assert_close(disc.weight, gen.weight + disc.parametrizations.weight.original, rtol=0, atol=0)
        assert torch.equal(disc.weight, model.discriminator.embed.tokens.weight)
