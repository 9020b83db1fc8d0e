"""Models whose forward leaves parameters without a gradient (Longformer without global tokens, BigBird's unread
pooler) train under DDP and FSDP on 2 gloo processes with the losses and weights of 1 process; they say which
parameters may go unused, and only they make DDP look for them."""

from __future__ import annotations

import pytest
import torch

from bunmyaku.models import big_bird, longformer
from bunmyaku.training.trainer import maybe_unused_parameters
from tests.training.helpers import VOCAB, tiny_gpt2
from tests.training.run_unused import tiny_model
from tests.training.test_distributed import _free_port, _start, _wait
from tests.training.test_fsdp import _assert_same_losses, _assert_same_weights, _grad_norms, _losses

SCRIPT = ["-m", "tests.training.run_unused"]
MODELS = ["longformer", "big_bird"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("unused")
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    for command, log_name in ((torchrun, "two"), ([], "one")):
        with open(out / f"{log_name}.log", "w+b") as log:
            code = _wait(_start([*command, *SCRIPT, str(out), log_name], log), 240)
            log.seek(0)
            assert code == 0, log.read().decode(errors="replace")[-4000:]
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", MODELS)
def test_unused_parameters_train_on_two_processes_as_on_one(runs, strategy, name):
    single, two = runs / "single" / name, runs / strategy / name
    assert len(_losses(single)) == 4  # a log every step
    _assert_same_losses(_losses(two), _losses(single))
    torch.testing.assert_close(_grad_norms(two), _grad_norms(single), rtol=1e-5, atol=0)
    _assert_same_weights(two, single)  # the unused parameters included: still at their initial values on both


def _unused_after_backward(model, **inputs) -> set[str]:
    model.train()
    out = model(**inputs)
    scores = [getattr(out, field) for field in ("logits", "start_logits", "end_logits")]
    sum(t.square().mean() for t in scores if t is not None).backward()
    return {name for name, param in model.named_parameters() if param.grad is None}


HEADS = [
    (longformer.LongformerForMaskedLM, "every global projection"),
    (longformer.LongformerForTokenClassification, "every global projection"),
    (longformer.LongformerForSequenceClassification, "k_global's bias"),  # <s> is global: scored through the inputs
    (longformer.LongformerForQuestionAnswering, "k_global's bias"),
    (big_bird.BigBirdForMaskedLM, "the pooler"),
    (big_bird.BigBirdForSequenceClassification, "the pooler"),
    (big_bird.BigBirdForTokenClassification, "the pooler"),
]


@pytest.mark.parametrize("cls, unused", HEADS)
def test_models_list_the_parameters_a_forward_leaves_unused(cls, unused):
    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, dropout=0.0)
    if cls.__module__.endswith("longformer"):
        config = longformer.LongformerConfig(**sizes, max_seq_len=40, attention_window=8, sep_token_id=2)
    else:
        config = big_bird.BigBirdConfig(**sizes, max_seq_len=32, attention_type="original_full")
    model = cls.from_config(config)
    ids = torch.randint(5, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 4] = 2  # a separator: question answering finds its question before it
    found = _unused_after_backward(model, input_ids=ids)
    listed = set(maybe_unused_parameters(model))
    assert found and found <= listed  # every parameter the forward left unused is listed
    if unused == "every global projection":
        assert found == listed and len(listed) == 2 * 3 * 2  # 2 layers x (q, k, v) x (weight, bias)
    elif unused == "k_global's bias":
        assert found == {f"backbone.layers.{i}.attn.k_global.bias" for i in range(2)}
    else:
        assert found == listed == {"backbone.pooler.dense.weight", "backbone.pooler.dense.bias"}


def test_only_models_that_may_leave_parameters_unused_make_ddp_look_for_them():
    assert maybe_unused_parameters(tiny_gpt2()) == []  # DDP pays for no graph traversal
    model = tiny_model("big_bird")
    assert len(maybe_unused_parameters(model)) == 2
    model.backbone.pooler.requires_grad_(False)  # frozen: DDP waits for no gradient of it
    assert maybe_unused_parameters(model) == []


@pytest.mark.parametrize("terms", [None, "p2c|c2p"])
def test_deberta_without_position_terms_lists_its_relative_embeddings(terms):
    """relative_attention with no pos_att_type builds the relative embeddings (as transformers does) and reads none."""
    from bunmyaku.models import deberta

    config = deberta.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, dropout=0.0,
        relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm", pos_att_type=terms,
    )  # fmt: skip
    model = deberta.DebertaV2ForSequenceClassification.from_config(config)
    ids = torch.randint(5, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    found = _unused_after_backward(model, input_ids=ids)
    listed = set(maybe_unused_parameters(model))
    assert found == listed
    assert listed == (
        set() if terms else {"backbone.rel_embed.weight", "backbone.rel_norm.weight", "backbone.rel_norm.bias"}
    )
