"""ModernBERT parity with ``transformers``: every head, tiny configs whose local window (8) is shorter than the
padded batch (up to 40 tokens), both directions, losses, gradients, and the published config's tensor names."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, save

transformers = require_module("transformers")

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
CONFIGS = [
    dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        global_attn_every_n_layers=2,
        local_attention=8,
        max_position_embeddings=64,
    ),
    dict(  # every bias on, other activations, mean pooling, other RoPE bases, global every 3rd layer
        vocab_size=101,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=2,
        global_attn_every_n_layers=3,
        local_attention=8,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
        norm_bias=True,
        classifier_bias=True,
        decoder_bias=True,
        hidden_activation="gelu_new",
        classifier_activation="silu",
        classifier_pooling="mean",
        global_rope_theta=5000.0,
        local_rope_theta=300.0,
        norm_eps=1e-6,
    ),
    dict(  # an irregular pattern spelled as HF 5's layer_types, an odd window, an untied decoder without bias
        vocab_size=77,
        hidden_size=24,
        intermediate_size=31,
        num_hidden_layers=3,
        num_attention_heads=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        local_attention=11,
        max_position_embeddings=64,
        decoder_bias=False,
        tie_word_embeddings=False,
    ),
]

# task -> (HF class suffix, output fields to compare, extra config)
HEADS = {
    "base": ("Model", ["last_hidden_state"], {}),
    "masked-lm": ("ForMaskedLM", ["logits"], {}),
    "sequence-classification": ("ForSequenceClassification", ["logits"], {"num_labels": 3}),
    "token-classification": ("ForTokenClassification", ["logits"], {"num_labels": 5}),
    "question-answering": ("ForQuestionAnswering", ["start_logits", "end_logits"], {}),
    "multiple-choice": ("ForMultipleChoice", ["logits"], {}),
}


def _hf_model(task: str, index: int, seed: int = 0, attn: str = "sdpa", **extra):
    suffix, _, head_extra = HEADS[task]
    config = transformers.ModernBertConfig(**CONFIGS[index], **TOKENS, **head_extra, **extra)
    config._attn_implementation = attn
    return randomize(getattr(transformers, "ModernBert" + suffix)(config), seed=seed)


def _batch(vocab: int, seed: int, batch: int = 3, length: int = 40):
    """Right padding of varied lengths: a full row, one of 23 tokens (longer than the window), one of 5."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 23:] = 0
    mask[2, 5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _inputs(task: str, index: int, seed: int):
    ids, mask = _batch(CONFIGS[index]["vocab_size"], seed)
    if task == "multiple-choice":  # (B, N, T): 2 questions x 3 choices
        return dict(input_ids=ids.repeat(2, 1, 1), attention_mask=mask.repeat(2, 1, 1)), None
    return dict(input_ids=ids, attention_mask=mask), mask


def _compare(ours, theirs, fields, mask):
    for field in fields:
        a, b = ours[field], theirs[field]
        assert_close(a, b, mask if mask is not None and a.dim() >= 2 and a.shape[:2] == mask.shape else None)


@pytest.mark.parametrize("task", list(HEADS))
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_modernbert_parity_both_directions(tmp_path, task, index):
    hf_model = _hf_model(task, index, seed=index)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))  # the head from `architectures`
    assert type(model).task == task and type(model).__name__ == "ModernBert" + HEADS[task][0]
    inputs, mask = _inputs(task, index, seed=index)
    fields = HEADS[task][1]
    with torch.no_grad():
        expected = hf_model(**inputs)
        _compare(model(**inputs), expected, fields, mask)
        # and back: bunmyaku saves, transformers loads
        reloaded = type(hf_model).from_pretrained(save(model, tmp_path / "ours")).eval()
        assert reloaded.config.layer_types == hf_model.config.layer_types
        assert reloaded.config.rope_parameters == hf_model.config.rope_parameters
        assert reloaded.config.sliding_window == hf_model.config.sliding_window
        _compare(reloaded(**inputs), expected, fields, mask)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("route", ["row-groups", "whole-batch", "padded"])
def test_hidden_states_at_real_positions(tmp_path, monkeypatch, index, route):
    """Every layer's output (the last one normed, as HF returns it), on each path: packed with attention by row
    groups (CPU), packed with the batch re-padded as a whole (what runs on CUDA), and padded. The packed routes must
    really pack the batch."""
    from bunmyaku.models import modernbert

    unpad = route != "padded"
    hf_model = _hf_model("base", index, seed=3)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), unpad=unpad)
    packings = []
    original = modernbert.Packing.from_mask

    def from_mask(m):
        packing = original(m)
        assert packing.groups is not None  # on CPU
        if route == "whole-batch":
            packing.groups = None
        packings.append(1)
        return packing

    monkeypatch.setattr(modernbert.Packing, "from_mask", from_mask)
    inputs, mask = _inputs("base", index, seed=5)
    with torch.no_grad():
        ours = model(**inputs, output_hidden_states=True).hidden_states
        theirs = hf_model(**inputs, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == CONFIGS[index]["num_hidden_layers"] + 1
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b, mask)
    assert packings == ([1] if unpad else [])


def test_eager_attention_both_sides(tmp_path):
    """transformers' eager attention against ours, every position (padding included) on the padded path."""
    hf_model = _hf_model("base", 0, seed=4, attn="eager")
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), attn_implementation="eager", unpad=False)
    inputs, _ = _inputs("base", 0, seed=6)
    with torch.no_grad():
        assert_close(model(**inputs).last_hidden_state, hf_model(**inputs).last_hidden_state)


def _labels(task: str, inputs: dict, mask, at_padding: bool):
    gen = torch.Generator().manual_seed(1)
    if task == "masked-lm":
        ids = inputs["input_ids"]
        return {"labels": ids.masked_fill((torch.rand(ids.shape, generator=gen) < 0.6) | (mask == 0), -100)}
    if task == "token-classification":
        labels = torch.randint(0, 5, mask.shape, generator=gen)
        return {"labels": labels if at_padding else labels.masked_fill(mask == 0, -100)}
    if task == "sequence-classification":
        return {"labels": torch.tensor([0, 2, 1])}
    if task == "question-answering":  # a start inside the padding, one past the end (ignored)
        return {"start_positions": torch.tensor([1, 30, 50]), "end_positions": torch.tensor([2, 33, 50])}
    return {"labels": torch.tensor([2, 0])}  # multiple choice


LOSS_CASES = [(task, False) for task in HEADS if task != "base"] + [("token-classification", True)]


@pytest.mark.parametrize(("task", "at_padding"), LOSS_CASES)
@pytest.mark.parametrize("index", [0, 1])
def test_losses_and_gradients_match(tmp_path, task, at_padding, index):
    """The loss, and the gradient of every parameter (HF names), equal transformers'."""
    hf_model = _hf_model(task, index, seed=7)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"), task=task)
    inputs, mask = _inputs(task, index, seed=8)
    labels = _labels(task, inputs, mask, at_padding)
    theirs = hf_model(**inputs, **labels).loss
    ours = model(**inputs, **labels).loss
    assert_close(ours, theirs)
    theirs.backward()
    ours.backward()
    hf_params = dict(hf_model.named_parameters())
    compared = 0
    for name, param in model.named_parameters():
        hf_param = hf_params[model._ours_to_hf(name)]
        assert param.grad is not None, name
        assert_close(param.grad, hf_param.grad, atol=2e-5)
        compared += 1
    assert compared == len(hf_params)  # every parameter compared (a tied one is listed once on both sides)


@pytest.mark.parametrize("how", ["config", "keyword"])
def test_sparse_prediction(tmp_path, how):
    """Logits and loss at the labelled positions only: HF's ``sparse_prediction`` config, or our ``masked_only``."""
    hf_model = _hf_model("masked-lm", 0, seed=9, sparse_prediction=True)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    inputs, mask = _inputs("masked-lm", 0, seed=10)
    labels = _labels("masked-lm", inputs, mask, False)["labels"]
    if how == "keyword":
        model.config.sparse_prediction = False
    with torch.no_grad():
        expected = hf_model(**inputs, labels=labels)
        out = model(**inputs, labels=labels, masked_only=how == "keyword")
    assert out.logits.shape == (int((labels != -100).sum()), 99) == expected.logits.shape
    assert_close(out.logits, expected.logits)
    assert_close(out.loss, expected.loss)


# answerdotai/ModernBERT-base's config.json as published (transformers 4.47's keys: global_attn_every_n_layers and the
# two RoPE bases rather than layer_types and rope_parameters), with the values of transformers' config defaults.
MODERNBERT_BASE = {
    "architectures": ["ModernBertForMaskedLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 50281,
    "classifier_activation": "gelu",
    "classifier_bias": False,
    "classifier_dropout": 0.0,
    "classifier_pooling": "mean",
    "cls_token_id": 50281,
    "decoder_bias": True,
    "deterministic_flash_attn": False,
    "embedding_dropout": 0.0,
    "eos_token_id": 50282,
    "global_attn_every_n_layers": 3,
    "global_rope_theta": 160000.0,
    "gradient_checkpointing": False,
    "hidden_activation": "gelu",
    "hidden_size": 768,
    "initializer_cutoff_factor": 2.0,
    "initializer_range": 0.02,
    "intermediate_size": 1152,
    "layer_norm_eps": 1e-05,
    "local_attention": 128,
    "local_rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "mlp_dropout": 0.0,
    "model_type": "modernbert",
    "norm_bias": False,
    "norm_eps": 1e-05,
    "num_attention_heads": 12,
    "num_hidden_layers": 22,
    "pad_token_id": 50283,
    "position_embedding_type": "absolute",
    "sep_token_id": 50282,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0",
    "vocab_size": 50368,
}


def test_published_config_builds_hf_tensor_names_and_shapes():
    """ModernBERT-base's config gives the tensors transformers builds from it, name for name and shape for shape
    (on the meta device: no memory, no download), and the same layer kinds, window and RoPE bases."""
    from bunmyaku.models.modernbert import ModernBertForMaskedLM

    hf_config = transformers.ModernBertConfig.from_dict(dict(MODERNBERT_BASE))
    with torch.device("meta"):
        hf_model = transformers.ModernBertForMaskedLM(hf_config)
        model = ModernBertForMaskedLM(ModernBertForMaskedLM.configure(dict(MODERNBERT_BASE)))
    theirs = {k: tuple(v.shape) for k, v in hf_model.state_dict().items() if k != "decoder.weight"}  # tied
    ours = {k: tuple(v.shape) for k, v in model.hf_state_dict().items()}
    assert ours == theirs
    # token table + embedding norm, 6 per layer (layer 0 has no attention norm), final norm, head dense + norm,
    # decoder bias: no biases elsewhere (attention_bias, mlp_bias, norm_bias, classifier_bias are all False)
    assert len(ours) == 2 + 22 * 6 - 1 + 1 + 2 + 1
    config = model.config
    assert config.layer_types == hf_config.layer_types
    assert config.layer_types[:4] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert config.window == hf_config.sliding_window == 64
    assert config.global_rope_theta == hf_config.rope_parameters["full_attention"]["rope_theta"] == 160000.0
    assert config.local_rope_theta == hf_config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    saved = model.hf_config()
    assert transformers.ModernBertConfig.from_dict(saved).to_dict()["rope_parameters"] == hf_config.rope_parameters


def test_bad_config_values_are_named():
    from bunmyaku.models.modernbert import ModernBertConfig

    with pytest.raises(ValueError, match="classifier_pooling"):
        ModernBertConfig(classifier_pooling="max")
    with pytest.raises(ValueError, match="layer_types"):
        ModernBertConfig(num_layers=2, layer_types=["full_attention", "local"])
    with pytest.raises(ValueError, match="rope_type"):
        ModernBertConfig.from_hf({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}})


def test_output_attentions_is_refused_not_silently_empty():
    from bunmyaku.models.modernbert import ModernBertConfig, ModernBertModel

    model = ModernBertModel.from_config(ModernBertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                                                         intermediate_size=40, pad_token_id=0))  # fmt: skip
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=torch.tensor([[5, 6, 7]]), output_attentions=True)


def test_gradient_checkpointing_keeps_hf_gradients(tmp_path):
    hf_model = _hf_model("token-classification", 1, seed=12)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    model.gradient_checkpointing_enable()
    model.train()  # every dropout is 0 in these configs: train mode only switches checkpointing on
    assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
    inputs, mask = _inputs("token-classification", 1, seed=13)
    labels = _labels("token-classification", inputs, mask, False)
    model(**inputs, **labels).loss.backward()
    hf_model(**inputs, **labels).loss.backward()
    hf_params = dict(hf_model.named_parameters())
    for name, param in model.named_parameters():
        assert_close(param.grad, hf_params[model._ours_to_hf(name)].grad, atol=2e-5)


def test_finetune_picks_modernbert_and_transformers_loads_the_result(tmp_path):
    """`bunmyaku.finetune` on a ModernBERT folder (a BERT-style tokenizer, whose token_type_ids are ignored):
    the classifier learns a toy task and its folder is a ModernBertForSequenceClassification for transformers."""
    import json

    from bunmyaku.models.modernbert import ModernBertConfig, ModernBertModel
    from tests.finetune.helpers import SPECIALS, WORDS, finetune, sentiment_rows, write_tsv

    folder = tmp_path / "modernbert"
    folder.mkdir()
    vocab = SPECIALS + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=len(vocab), hidden_size=32, num_layers=3, num_heads=4, intermediate_size=40,
                              max_seq_len=64, local_attention=4, pad_token_id=0, cls_token_id=2, sep_token_id=3,
                              bos_token_id=2, eos_token_id=3)  # fmt: skip
    ModernBertModel.from_config(config).save_pretrained(folder)
    data = write_tsv(tmp_path / "d.tsv", sentiment_rows(16))
    summary = finetune(tmp_path / "run", task="text-classification", model=str(folder), train=str(data),
                       eval=str(data), text_column="0", label_column="1")  # fmt: skip
    assert summary["accuracy"] == 1.0
    saved = tmp_path / "run" / "model"
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["ModernBertForSequenceClassification"]
    assert type(transformers.AutoModelForSequenceClassification.from_pretrained(saved)).__name__ == (
        "ModernBertForSequenceClassification"
    )


def test_left_padding_and_inputs_embeds(tmp_path):
    """Left padding runs padded (its positions count the padding, as HF's do); embeddings given instead of ids."""
    hf_model = _hf_model("base", 1, seed=14)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    ids, mask = _batch(CONFIGS[1]["vocab_size"], seed=15)
    ids, mask = ids.flip(-1), mask.flip(-1)
    embeds = hf_model.embeddings.tok_embeddings(ids)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected, mask)
        assert_close(model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, expected, mask)
        right = mask.flip(-1)
        assert_close(
            model(inputs_embeds=embeds.flip(1), attention_mask=right).last_hidden_state,
            hf_model(inputs_embeds=embeds.flip(1), attention_mask=right).last_hidden_state,
            right,
        )


@pytest.mark.parametrize("kind", ["sequence", "token", "choice"])
def test_multi_sample_dropout_is_the_mean_of_n_dropped_heads(kind):
    """Training with ``multi_sample_dropout = N``: the loss is the mean of N losses, each under its own dropout mask
    on the prediction head's output, written out here on the same random stream; the logits are their mean."""
    import torch.nn.functional as F

    from bunmyaku.models import modernbert

    P, N = 0.4, 3
    config = modernbert.ModernBertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                                         intermediate_size=40, pad_token_id=0, classifier_dropout=P,
                                         id2label={0: "a", 1: "b", 2: "c"})  # fmt: skip
    cls = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification", "choice": "ForMultipleChoice"}
    torch.manual_seed(0)
    model = getattr(modernbert, "ModernBert" + cls[kind]).from_config(config)
    ids, mask = _batch(99, seed=16, length=12)
    labels = torch.tensor([0, 2, 1]) if kind == "sequence" else torch.randint(0, 3, (3, 12))
    if kind == "choice":
        ids, mask, labels = ids.view(3, 1, 12).repeat(1, 2, 1), mask.view(3, 1, 12).repeat(1, 2, 1), labels[:, 0] % 2
    with torch.no_grad():
        # padded: the token labels cover padding positions too, which makes the head model run padded as well
        states = model.eval().backbone(input_ids=ids.view(-1, 12), attention_mask=mask.view(-1, 12), unpad=False)
        states = states.last_hidden_state
        h = model.head.transform(states[:, 0] if kind != "token" else states)  # cls pooling: the first token

        def dropped():
            logits = F.linear(F.dropout(h, P, training=True), model.head.classifier.weight, model.head.classifier.bias)
            if kind == "choice":
                return logits.view(3, 2)
            return logits

        torch.manual_seed(1)
        samples = [dropped() for _ in range(N)]
        scored = [x.reshape(-1, x.size(-1)) if kind == "token" else x for x in samples]
        target = labels.reshape(-1) if kind == "token" else labels
        expected_loss = torch.stack([F.cross_entropy(x, target) for x in scored]).mean()
        model.train()
        model.multi_sample_dropout = N
        torch.manual_seed(1)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, expected_loss)
    assert_close(out.logits, torch.stack(samples).mean(0))
    assert not torch.allclose(samples[0], samples[1])  # the masks differ: N samples, not one


def test_initialisation_follows_hf_recipe():
    """Truncated normals cut at 2 std: std 0.02 for input projections and embeddings, 0.02 / sqrt(2 * layers) for
    each residual branch's output projection, 1 / sqrt(C) for a classifier; the std of a normal truncated at +-2
    sigma is 0.8796 sigma (hand-computed: sqrt(1 - 2 * 2 * phi(2) / (1 - 2 * Phi(-2))))."""
    from bunmyaku.models.modernbert import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=500, hidden_size=128, num_layers=8, num_heads=4, intermediate_size=256,
                              pad_token_id=0)  # fmt: skip
    model = ModernBertForSequenceClassification.from_config(config)
    layer = model.backbone.layers[3]
    expected = {
        "tokens": (model.backbone.embed.tokens.weight, 0.02),
        "qkv_proj": (layer.attn.qkv_proj.weight, 0.02),
        "fc_in": (layer.mlp.fc_in.weight, 0.02),
        "out_proj": (layer.attn.out_proj.weight, 0.02 / 4.0),
        "fc_out": (layer.mlp.fc_out.weight, 0.02 / 4.0),
        "classifier": (model.head.classifier.weight, 128**-0.5),
    }
    for name, (weight, std) in expected.items():
        assert weight.abs().max() <= 2 * std + 1e-7, name
        assert abs(weight.std().item() / (0.8796 * std) - 1) < 0.1, name
    assert bool((layer.mlp_norm.weight == 1).all()) and layer.mlp_norm.bias is None  # norm_bias False
