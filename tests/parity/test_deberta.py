"""DeBERTa-v2 / v3 parity with ``transformers``: every head, configs shaped like deberta-v3 and v2-xlarge, padded
batches, logits and losses, both directions (HF saves -> bunmyaku loads, bunmyaku saves -> HF loads)."""

from __future__ import annotations

import pytest
import torch

import bunmyaku
from bunmyaku.models import deberta
from bunmyaku.models.disentangled import disentangled_attention
from tests.conftest import require_module
from tests.parity.helpers import assert_close, randomize, right_padded_batch, save

transformers = require_module("transformers")
hf_deberta = require_module("transformers.models.deberta_v2.modeling_deberta_v2")

VOCAB = 99
LENGTH = 20  # past position_buckets / 2 = 4 and past max_relative_positions: log buckets and clamping both run
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
CONFIGS = {
    # deberta-v3-xsmall / base: shared keys, both terms, log buckets, normed relative embeddings, no absolute positions
    "v3": dict(
        TINY,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type="p2c|c2p",
        position_biased_input=False,
        type_vocab_size=0,
        max_position_embeddings=64,
    ),
    # v3 with an embedding projection, segments, c2p only, own position projection, buckets to max_position_embeddings
    "v3-proj": dict(
        TINY,
        embedding_size=24,
        type_vocab_size=2,
        relative_attention=True,
        position_buckets=8,
        share_att_key=False,
        pos_att_type=["c2p"],
        position_biased_input=False,
        hidden_act="gelu_new",
        max_position_embeddings=40,
    ),
    # deberta-v2-xlarge: the convolution, own position projections, absolute positions too, no buckets
    "v2-xlarge": dict(
        TINY,
        num_hidden_layers=3,
        relative_attention=True,
        max_relative_positions=6,
        norm_rel_ebd="layer_norm",
        share_att_key=False,
        pos_att_type="p2c|c2p",
        position_biased_input=True,
        conv_kernel_size=3,
        conv_act="gelu",
        type_vocab_size=0,
        max_position_embeddings=64,
    ),
    # p2c only, grouped convolution, relative attention over all positions (no buckets, max_relative_positions unset)
    "v2-p2c": dict(
        TINY,
        relative_attention=True,
        share_att_key=False,
        pos_att_type="p2c",
        conv_kernel_size=3,
        conv_groups=2,
        type_vocab_size=2,
        max_position_embeddings=64,
        layer_norm_eps=1e-5,
    ),
    # the config's defaults: no relative attention at all (absolute positions only, a plain attention)
    "v2-absolute": dict(TINY, type_vocab_size=2, max_position_embeddings=64),
    # relative embeddings present but no position term (transformers builds rel_embeddings and never reads them)
    "v2-no-terms": dict(TINY, relative_attention=True, position_buckets=8, max_position_embeddings=64),
}

# DeBERTa v1 (model_type "deberta"): fused q/k/v, no buckets; relative span min(T, max_relative_positions)
V1_CONFIGS = {
    "v1-absolute": dict(TINY, type_vocab_size=2, max_position_embeddings=64),
    "v1-base": dict(
        TINY,
        relative_attention=True,
        pos_att_type="c2p|p2c",
        position_biased_input=False,
        type_vocab_size=0,
        max_position_embeddings=64,
    ),
    "v1-clamped": dict(
        TINY,
        relative_attention=True,
        max_relative_positions=6,
        pos_att_type="p2c",
        position_biased_input=True,
        type_vocab_size=2,
        max_position_embeddings=64,
    ),
}

# task -> (HF class, fields read at real positions only, fields read everywhere, extra config)
HEADS = {
    "base": ("DebertaV2Model", ["last_hidden_state"], [], {}),
    "masked-lm": ("DebertaV2ForMaskedLM", ["logits"], [], {}),
    "sequence-classification": ("DebertaV2ForSequenceClassification", [], ["logits"], {"num_labels": 3}),
    "token-classification": ("DebertaV2ForTokenClassification", ["logits"], [], {"num_labels": 5}),
    "question-answering": ("DebertaV2ForQuestionAnswering", ["start_logits", "end_logits"], [], {}),
    "multiple-choice": ("DebertaV2ForMultipleChoice", [], ["logits"], {}),
}


def _hf_model(name: str, task: str, seed: int = 0, **extra):
    """A random HF model of config ``name`` (v2 / v3, or v1 for the V1_CONFIGS) with the ``task`` head."""
    if name in V1_CONFIGS:
        hf_class = getattr(transformers, HEADS[task][0].replace("V2", ""))
        config = transformers.DebertaConfig(**{**V1_CONFIGS[name], **HEADS[task][3], **extra})
    else:
        hf_class = getattr(transformers, HEADS[task][0])
        config = transformers.DebertaV2Config(**{**CONFIGS[name], **HEADS[task][3], **extra})
    return randomize(hf_class(config), seed=seed)


def _inputs(task: str, seed: int = 0):
    """A right-padded batch with two segments; (B, N, T) for multiple choice (2 questions x 3 choices)."""
    ids, mask = right_padded_batch(VOCAB, length=LENGTH, seed=seed)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if task == "multiple-choice":
        inputs = {k: v.view(1, 3, -1).repeat(2, 1, 1) for k, v in inputs.items()}
    return inputs, mask


def _compare(ours, theirs, task, mask):
    _, real_only, everywhere, _ = HEADS[task]
    for field in real_only:
        assert_close(ours[field], getattr(theirs, field), mask)
    for field in everywhere:
        assert_close(ours[field], getattr(theirs, field))


# transformers has no v1 multiple-choice head
CASES = [(name, task) for name in CONFIGS for task in HEADS]
CASES += [(name, task) for name in V1_CONFIGS for task in HEADS if task != "multiple-choice"]


@pytest.mark.parametrize(("name", "task"), CASES)
def test_deberta_parity_both_directions(tmp_path, name, task):
    hf_model = _hf_model(name, task, seed=len(task))
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))  # the head from ``architectures``
    assert type(model).task == task and type(model).__name__ == type(hf_model).__name__
    inputs, mask = _inputs(task, seed=1)
    with torch.no_grad():
        expected = hf_model(**inputs)
        _compare(model(**inputs), expected, task, mask)
        reloaded = type(hf_model).from_pretrained(save(model, tmp_path / "ours")).eval()
        _compare(reloaded(**inputs), expected, task, mask)


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "v3"] + ["v3"])
@pytest.mark.parametrize("task", ["base", "question-answering"])
def test_eager_reference_and_fast_kernel_both_match_transformers(tmp_path, name, task):
    """The default path runs the fast kernel (tested above); attn_implementation="eager" the transformers-style
    reference with gathers: both give HF's outputs, padding positions included for QA."""
    hf_model = _hf_model(name, task, seed=3)
    folder = save(hf_model, tmp_path / "hf")
    inputs, mask = _inputs(task, seed=4)
    with torch.no_grad():
        expected = hf_model(**inputs)
        for implementation in ("eager", "sdpa"):
            model = bunmyaku.from_pretrained(folder, attn_implementation=implementation)
            _compare(model(**inputs), expected, task, mask)


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.get("relative_attention")])
@pytest.mark.parametrize("task", ["base", "question-answering", "multiple-choice"])
def test_flex_route_matches_transformers_on_cpu(tmp_path, flex_on_cpu, name, task):
    """The route the default path takes on CUDA in eval (FlexAttention, the two distance tables read in score_mod),
    run eagerly on the CPU: transformers' outputs on a padded batch."""
    hf_model = _hf_model(name, task, seed=6)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    inputs, mask = _inputs(task, seed=7)
    with torch.no_grad():
        expected = hf_model(**inputs)
        _compare(model(**inputs), expected, task, mask)
    # every layer took the route, but a pooled head's last one, which computes the first token's row alone
    assert flex_on_cpu == ["disentangled"] * (model.config.num_layers - (task == "multiple-choice"))


@pytest.mark.parametrize("name", ["v3", "v2-xlarge", "v1-base"])
def test_masked_lm_current_head_layout(tmp_path, name):
    """legacy=False: the lm_predictions.lm_head layout of the EMD checkpoints, saved back under the same names."""
    hf_model = _hf_model(name, "masked-lm", seed=5, legacy=False)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    inputs, mask = _inputs("masked-lm", seed=2)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        assert_close(model(**inputs).logits, expected, mask)
        model.save_pretrained(tmp_path / "ours")
        names = bunmyaku.hub.files.checkpoint_keys(tmp_path / "ours")
        assert "lm_predictions.lm_head.dense.weight" in names and not any(k.startswith("cls.") for k in names)
        reloaded = type(hf_model).from_pretrained(tmp_path / "ours").eval()
        assert_close(reloaded(**inputs).logits, expected, mask)


def test_published_v3_checkpoint_layout(tmp_path):
    """A deberta-v3 checkpoint as published: its config has no ``legacy`` (so HF builds the legacy head and leaves it
    random), its trained head is under lm_predictions, and it carries unused absolute positions and the RTD head.
    bunmyaku fills masks with the trained head, i.e. the logits of HF's legacy=False model, and saves a folder HF's
    default (legacy) class loads with that head."""
    from safetensors.torch import load_file, save_file

    hf_model = _hf_model("v3", "masked-lm", seed=6, legacy=False)
    folder = save(hf_model, tmp_path / "hf")
    state = load_file(folder / "model.safetensors")
    state["deberta.embeddings.position_embeddings.weight"] = torch.randn(64, 32)
    state["mask_predictions.classifier.weight"] = torch.randn(1, 32)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = bunmyaku.hub.read_config(folder)
    del config["legacy"]
    bunmyaku.hub.files.write_json_atomic(folder / "config.json", config)
    model = bunmyaku.from_pretrained(folder)
    assert model.config.legacy
    inputs, mask = _inputs("masked-lm", seed=3)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        assert_close(model(**inputs).logits, expected, mask)
        reloaded = transformers.DebertaV2ForMaskedLM.from_pretrained(save(model, tmp_path / "ours")).eval()
        assert reloaded.config.legacy
        assert_close(reloaded(**inputs).logits, expected, mask)


def _loss_cases():
    gen = torch.Generator().manual_seed(0)
    inputs, mask = _inputs("masked-lm", seed=4)
    ids = inputs["input_ids"]
    mlm = ids.masked_fill(torch.rand(ids.shape, generator=gen) < 0.6, -100)
    tags = torch.randint(0, 5, ids.shape, generator=gen)  # labels at padding positions too: HF scores them
    seq = {"num_labels": 3}
    return [
        ("masked-lm", {}, {"labels": mlm}),
        ("masked-lm", {"legacy": False}, {"labels": mlm}),
        ("token-classification", {"num_labels": 5}, {"labels": tags}),
        ("token-classification", {"num_labels": 5}, {"labels": tags.masked_fill(mask == 0, -100)}),
        (
            "question-answering",
            {},
            {"start_positions": torch.tensor([1, 3, 40]), "end_positions": torch.tensor([2, 9, 40])},
        ),
        ("multiple-choice", {}, {"labels": torch.tensor([2, 0])}),
        # problem_type unset: DeBERTa's own rules
        ("sequence-classification", seq, {"labels": torch.tensor([0, 2, 1])}),
        ("sequence-classification", seq, {"labels": torch.tensor([0, -1, 2])}),  # negative ids are left out
        ("sequence-classification", seq, {"labels": torch.tensor([-1, -1, -1])}),  # none left: zero
        ("sequence-classification", seq, {"labels": torch.tensor([[0.2, 0.5, 0.3], [1.0, 0, 0], [0, 0.1, 0.9]])}),
        ("sequence-classification", {"num_labels": 1}, {"labels": torch.tensor([0.5, -1.0, 2.0])}),
        # problem_type set: the shared rules
        (
            "sequence-classification",
            dict(seq, problem_type="single_label_classification"),
            {"labels": torch.tensor([2, 1, 0])},
        ),
        (
            "sequence-classification",
            dict(seq, problem_type="multi_label_classification"),
            {"labels": torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 1]])},
        ),
        (
            "sequence-classification",
            {"num_labels": 1, "problem_type": "regression"},
            {"labels": torch.tensor([1.5, 0.0, -2.0])},
        ),
    ]


@pytest.mark.parametrize("name", ["v3", "v2-xlarge", "v1-clamped"])
def test_losses_match(tmp_path, name):
    inputs_by_task = {task: _inputs(task, seed=4)[0] for task in ("masked-lm", "multiple-choice")}
    for i, (task, extra, labels) in enumerate(_loss_cases()):
        if name in V1_CONFIGS and task == "multiple-choice":
            continue
        hf_model = _hf_model(name, task, seed=i, **{"num_labels": 2, **extra})
        model = bunmyaku.from_pretrained(save(hf_model, tmp_path / str(i)))
        inputs = inputs_by_task["multiple-choice" if task == "multiple-choice" else "masked-lm"]
        with torch.no_grad():
            ours, theirs = model(**inputs, **labels).loss, hf_model(**inputs, **labels).loss
        assert torch.isfinite(ours), (task, extra, labels)
        assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["v3", "v2-xlarge", "v1-base"])
def test_training_gradients_match(tmp_path, name):
    """Train mode without dropout: the loss's gradient on every parameter is HF's, with gradient checkpointing too."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf_model = _hf_model(name, "sequence-classification", seed=8, **no_dropout)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    inputs, _ = _inputs("sequence-classification", seed=5)
    labels = torch.tensor([1, 0, 2])
    assert_training_gradients_match(model, hf_model.train(), inputs, labels)


def assert_training_gradients_match(model, hf_model, inputs, labels) -> None:
    """Every parameter's gradient of the training loss equals transformers', with and without checkpointing."""
    hf_model(**inputs, labels=labels).loss.backward()
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters()}
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing_enable(checkpointing)
        model.train()
        model(**inputs, labels=labels).loss.backward()
        for our_name, param in model.named_parameters():
            assert param.grad is not None, our_name
            assert_close(param.grad, hf_grads[model._ours_to_hf(our_name)], atol=2e-5)


BUCKETINGS = [(256, 512), (8, 16), (8, 64), (-1, 6), (32, 128), (4, 15), (8, 384)]


@pytest.mark.parametrize(("buckets", "max_position"), BUCKETINGS)
def test_relative_positions_match_transformers(buckets, max_position):
    """Log buckets are a ceil of a log ratio: every distance of long sequences lands in HF's bucket ((4, 15) and
    (8, 384) have distances where a float64 log ratio would round into the next bucket)."""
    for length in (1, 7, min(2 * max_position + 5, 1100)):  # past max_position both ways
        probe = torch.empty(1, length, 1)
        expected = hf_deberta.build_relative_position(probe, probe, bucket_size=buckets, max_position=max_position)
        assert torch.equal(deberta.relative_positions(length, buckets, max_position), expected[0]), length


@pytest.mark.parametrize("name", ["v3", "v2-xlarge"])
def test_output_attentions_and_hidden_states(tmp_path, name):
    """Every layer's attention weights (padding rows included) and hidden states, as HF returns them."""
    hf_model = _hf_model(name, "base", seed=9)
    model = bunmyaku.from_pretrained(save(hf_model, tmp_path / "hf"))
    inputs, mask = _inputs("base", seed=6)
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True, output_hidden_states=True)
        theirs = hf_model(**inputs, output_attentions=True, output_hidden_states=True)
    assert (
        len(ours.attentions) == len(theirs.attentions) == len(ours.hidden_states) - 1 == len(theirs.hidden_states) - 1
    )
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert_close(a, b)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert_close(a, b, mask)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_attention_mask_none_is_all_real(impl):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=gen) for _ in range(3))
    pos = torch.randn(3, 8, 4, generator=gen)
    rel = deberta.relative_positions(6, 4, 8)
    args = (q, k, v, pos, pos.flip(1), rel, 4)

    def attend(mask):
        return disentangled_attention(*args, mask, 0.3, impl=impl)

    full = attend(None)
    assert_close(attend(torch.ones(2, 6)), full, atol=1e-6)
    # padding changes the real rows' output only by removing the padded keys
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    padded = attend(mask)
    assert not torch.allclose(padded[0, :, :4], full[0, :, :4])
    assert_close(padded[1], full[1], atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pos_att_type": "c2p|p2p"}, "unknown terms"),
        ({"norm_rel_ebd": "rms"}, "norm_rel_ebd"),
        ({"conv_kernel_size": 2}, "odd"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "multiple"),
        ({"conv_kernel_size": 3, "conv_act": "swishy"}, "activation"),
        ({"attention_head_size": 6}, "attention_head_size"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        deberta.DebertaV2Config.from_hf(dict(CONFIGS["v3"], **overrides))


def test_mlm_projection_needs_the_legacy_layout():
    config = deberta.DebertaV2Config.from_hf(dict(CONFIGS["v3-proj"], legacy=False))
    with pytest.raises(ValueError, match="legacy=True"):
        deberta.DebertaV2ForMaskedLM(config)


# config.json of microsoft/deberta-v3-base, microsoft/deberta-v2-xlarge and microsoft/deberta-base (fewer layers)
PUBLISHED = {
    "deberta-v3-base": dict(
        model_type="deberta-v2",
        hidden_size=768,
        intermediate_size=3072,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type="p2c|c2p",
        layer_norm_eps=1e-7,
        max_relative_positions=-1,
        position_biased_input=False,
        num_attention_heads=12,
        num_hidden_layers=2,
        type_vocab_size=0,
        vocab_size=128100,
    ),
    "deberta-v2-xlarge": dict(
        model_type="deberta-v2",
        hidden_size=1536,
        intermediate_size=6144,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type="p2c|c2p",
        layer_norm_eps=1e-7,
        conv_kernel_size=3,
        conv_act="gelu",
        max_relative_positions=-1,
        position_biased_input=False,
        num_attention_heads=24,
        attention_head_size=64,
        num_hidden_layers=2,
        type_vocab_size=0,
        vocab_size=128100,
    ),
    "deberta-base": dict(
        model_type="deberta",
        hidden_size=768,
        intermediate_size=3072,
        max_position_embeddings=512,
        relative_attention=True,
        pos_att_type="c2p|p2c",
        layer_norm_eps=1e-7,
        max_relative_positions=-1,
        position_biased_input=False,
        num_attention_heads=12,
        num_hidden_layers=2,
        type_vocab_size=0,
        vocab_size=50265,
    ),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize("legacy", [True, False])
def test_published_configs_have_hf_tensors(name, legacy):
    """At full width (on the meta device, no memory): every tensor HF's masked LM saves, by name and shape."""
    from bunmyaku.models.auto import model_class

    config = dict(PUBLISHED[name], legacy=legacy)
    hf_config_class = (
        transformers.DebertaV2Config if config["model_type"] == "deberta-v2" else transformers.DebertaConfig
    )
    hf_class = (
        transformers.DebertaV2ForMaskedLM if config["model_type"] == "deberta-v2" else transformers.DebertaForMaskedLM
    )
    cls = model_class(config["model_type"], "masked-lm")
    with torch.device("meta"):
        hf_model = hf_class(hf_config_class(**{k: v for k, v in config.items() if k != "model_type"}))
        model = cls(cls.configure(config))
    hf_state = {k: tuple(v.shape) for k, v in hf_model.state_dict().items() if "position_ids" not in k}
    for tied in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        hf_state.pop(tied, None)
    ours = {k: tuple(v.shape) for k, v in model.hf_state_dict().items()}
    assert ours == hf_state
