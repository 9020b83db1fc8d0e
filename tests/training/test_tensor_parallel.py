"""Tensor parallelism (``tp``): 2 gloo processes split every block's heads and feed-forward width, and the vocabulary
(token table and LM / masked-LM head rows; 99 ids split 50 + 49).

Two launches serve the 2-process tests (see tests/training/run_tp.py): torchrun's 2 processes train a tiny GPT-2 (tied
head), a tiny Llama (grouped-query attention: 4 query, 2 key/value heads; untied head), the same Llama tied, a tiny
BERT sequence classifier (padded batches, the packed encoder path) and a tiny BERT masked LM with ``tp 2``, then
generate; 1 process does the same without any parallelism, the oracle.
A third launch (4 processes, ``tp 2`` x ``strategy fsdp`` on a 2 x 2 mesh) trains the GPT-2 once more.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bunmyaku.training import TrainArgs, Trainer, sharding
from tests.conftest import require_module
from tests.training.run_tp import TP_PLUGINS, tiny_llama
from tests.training.test_distributed import _free_port, _start, _wait
from tests.training.test_fsdp import _assert_same_losses, _grad_norms, _losses

SCRIPT = ["-m", "tests.training.run_tp"]
MODELS = ("gpt2", "llama", "llama-tied", "bert", "bert-mlm")
# the split vocabulary sums the hidden states' gradient in another order, and Adam's division by the root of a tiny
# second moment magnifies that rounding in a near-zero gradient: one of GPT-2's 1024 c_proj entries moves 1.2e-5
# after 4 steps, every other weight less than 4e-6
SPLIT_ATOL = 3e-5


def _launch(out, mode: str, processes: int) -> None:
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(_free_port())]
    command = [*SCRIPT, str(out), mode] if processes == 1 else [*torchrun, *SCRIPT, str(out), mode]
    with open(out / f"{mode}.log", "w+b") as log:
        code = _wait(_start(command, log), 240)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    _launch(out, "two", 2)
    _launch(out, "one", 1)
    return out


def _assert_same_weights(got_dir, expected_dir, atol):
    got, expected = load_file(got_dir / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=atol, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("model", MODELS)
def test_tp_on_two_processes_matches_one_process(runs, model):
    """Accumulation (2 micro-batches), clipping (it acts on the LMs) and evaluation; the export gathers the split
    weights into one ordinary folder. The weights agree to ``SPLIT_ATOL``; the gradient norms to 1e-5 relative at
    every step."""
    one, two = _losses(runs / f"{model}-one"), _losses(runs / f"{model}-two")
    assert len(one) == 6  # training logs at steps 1, 2, 3, 4 and evaluations at 2, 4
    _assert_same_losses(two, one)
    norms = _grad_norms(runs / f"{model}-two"), _grad_norms(runs / f"{model}-one")
    torch.testing.assert_close(*norms, rtol=1e-5, atol=0)
    _assert_same_weights(runs / f"{model}-two", runs / f"{model}-one", atol=SPLIT_ATOL)
    start = {"gpt2": 4.6, "llama": 4.6, "llama-tied": 4.6, "bert": 1.09, "bert-mlm": 4.6}[model]
    assert one[0][2] == pytest.approx(start, abs=0.02)  # the untrained loss (ln 99, ln 3): the runs did train...
    evals = [loss for _, kind, loss in one if kind == "eval"]
    assert evals[1] < evals[0]  # ...and learnt: the held-out loss fell from step 2 to step 4


@pytest.mark.distributed
@pytest.mark.parametrize("plugin", sorted(TP_PLUGINS))
def test_plugins_under_tp_match_one_process(runs, plugin):
    """EMA's average of the split weights (each process its rows or columns) is saved sharded and gathered for the
    export; SAM's norm covers the split gradients over both processes and the whole ones once: tp 2 trains and
    exports as 1 process does. SAM's weights agree to 1e-4 (one of 4096 entries of a feed-forward weight moves 3.7e-5,
    the rounding magnified by Adam as in the plain run, see ``SPLIT_ATOL``), its gradient norms to 1e-5 relative."""
    two, one = runs / f"gpt2-{plugin}-two", runs / f"gpt2-{plugin}-one"
    _assert_same_losses(_losses(two), _losses(one))
    torch.testing.assert_close(_grad_norms(two), _grad_norms(one), rtol=1e-5, atol=0)
    _assert_same_weights(two, one, atol={"ema": SPLIT_ATOL, "sam": 1e-4}[plugin])
    with_plugin, plain = load_file(one / "model.safetensors"), load_file(runs / "gpt2-one" / "model.safetensors")
    assert max(float((with_plugin[k] - plain[k]).abs().max()) for k in plain) > 1e-3  # far above the tolerances


@pytest.mark.distributed
def test_tp_splits_heads_and_widths(runs):
    """Rank 0 holds half of each layer's heads (Llama: 2 of 4 query, 1 of 2 key/value heads) and half of each
    projection: q / k rows (column-parallel), out_proj / fc_out columns (row-parallel)."""
    local = json.loads((runs / "local-two.json").read_text())
    assert local["gpt2"] == {"heads": [2, 2], "q_proj": [16, 32], "k_proj": [16, 32], "out_proj": [32, 16],
                             "fc_out": [32, 64]}  # fmt: skip
    assert local["llama"] == {"heads": [2, 1], "q_proj": [16, 32], "k_proj": [8, 32], "out_proj": [32, 16],
                              "fc_out": [32, 24]}  # fmt: skip
    assert json.loads((runs / "local-one.json").read_text())["llama"]["heads"] == [4, 2]


@pytest.mark.distributed
def test_tp_splits_the_vocabulary_and_a_tied_head_stays_one_parameter(runs):
    """Each process holds its rows of the 99-id token table (50 + 49: DTensor splits a vocabulary tp does not divide
    unevenly) and the same rows of the LM head's weight (BERT: of the masked-LM bias); a tied head's weight is the
    table's parameter itself, so the model holds as many parameters as without tp."""
    two, one = json.loads((runs / "vocab-two.json").read_text()), json.loads((runs / "vocab-one.json").read_text())
    for model in MODELS:
        assert two[model]["table_rows"] == [50, 49], model
        assert one[model]["table_rows"] == [99], model
        assert two[model]["parameters"] == one[model]["parameters"], model
        assert two[model]["tied"] == one[model]["tied"], model
    for model in ("gpt2", "llama", "llama-tied", "bert-mlm"):
        assert two[model]["head_rows"] == [50, 49], model
    assert [two[m]["tied"] for m in ("gpt2", "llama", "llama-tied")] == [True, False, True]
    assert two["llama"]["parameters"] == two["llama-tied"]["parameters"] + 1  # the untied head's own weight


@pytest.mark.distributed
def test_generation_under_tp_matches_one_process(runs):
    """Greedy decoding with the KV cache (local heads) and the split vocabulary (every step gathers the logits) on
    the trained models gives the 1-process tokens."""
    one = json.loads((runs / "generate-one.json").read_text())
    assert sorted(one) == ["gpt2", "llama", "llama-tied"]
    assert json.loads((runs / "generate-two.json").read_text()) == one
    for rows in one.values():
        assert all(len(row) == 4 + 8 for row in rows)


@pytest.mark.distributed
@pytest.mark.parametrize("model", MODELS)
def test_tp_export_loads_in_transformers(runs, model):
    require_module("transformers")
    import transformers

    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "llama-tied": transformers.LlamaForCausalLM,
        "bert": transformers.BertForSequenceClassification,
        "bert-mlm": transformers.BertForMaskedLM,
    }[model]
    loaded, info = cls.from_pretrained(runs / f"{model}-two", output_loading_info=True)
    assert not any(info.values()), info
    reference = cls.from_pretrained(runs / f"{model}-one").eval()
    ids = torch.randint(10, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.distributed
def test_fsdp_times_tp_on_a_two_by_two_mesh_matches_one_process(runs):
    """4 processes: 2 data-parallel replicas (fully_shard over ``dp``), each split over 2 (``tp``); micro-batches of
    2 per replica, the 1-process run's global batch. The weights agree to 1e-4, not 1e-5: Adam divides by the root
    of tiny second moments, which magnifies the reduction order's rounding in near-zero gradients."""
    _launch(runs, "four", 4)
    _assert_same_losses(_losses(runs / "gpt2-four"), _losses(runs / "gpt2-one"))
    _assert_same_weights(runs / "gpt2-four", runs / "gpt2-one", atol=1e-4)


# ---------------------------------------------------------------------------------------------- in one process


def test_a_tp_that_does_not_divide_the_heads_is_refused():
    from tests.training.helpers import tiny_gpt2

    with pytest.raises(ValueError, match=r"tp 3 does not divide the model's 4 attention heads .*among \[1, 2, 4\]"):
        sharding.check_tensor_parallel(tiny_gpt2(), 3, 3, "ddp")
    with pytest.raises(ValueError, match=r"tp 4 does not divide the model's 2 key/value heads"):
        sharding.check_tensor_parallel(tiny_llama(), 4, 4, "ddp")  # 4 query heads split, 2 key/value heads do not
    sharding.check_tensor_parallel(tiny_llama(), 2, 2, "ddp")  # 2 does


@pytest.mark.parametrize(
    ("tp", "world", "strategy", "message"),
    [
        (2, 3, "ddp", "the 3 processes do not split into tensor-parallel groups of 2"),
        (2, 4, "ddp", "leaves 2 data-parallel replicas: use strategy fsdp"),
        (2, 4, "hsdp", "tp with strategy hsdp is not supported"),
    ],
)
def test_process_counts_tp_cannot_use_are_refused(tp, world, strategy, message):
    from tests.training.helpers import tiny_gpt2

    with pytest.raises(ValueError, match=message):
        sharding.check_tensor_parallel(tiny_gpt2(), tp, world, strategy)


def test_tp_in_one_process_says_to_launch_torchrun(tmp_path):
    from bunmyaku.data import CausalLMCollator, PackedBlocks
    from tests.training.helpers import EOS, random_split, tiny_gpt2

    args = TrainArgs(output_dir=str(tmp_path), max_steps=1, tp=2, device="cpu", progress=False, plot=False)
    with pytest.raises(ValueError, match="the 1 processes do not .* of 2; launch with torchrun --nproc-per-node 2"):
        Trainer(tiny_gpt2(), args, PackedBlocks(random_split(10), 16, EOS), collator=CausalLMCollator())


def test_tp_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="tp"):
        TrainArgs(output_dir=str(tmp_path), tp=0)


def test_data_coordinates_give_a_tp_group_the_same_batches():
    # mesh (dp, tp) = (2, 2): ranks 0, 1 form replica 0 and ranks 2, 3 replica 1
    assert [sharding.data_coordinates(rank, 4, 2) for rank in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert sharding.data_coordinates(3, 4, 1) == (3, 4)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"precision": "fp16"}, "tp 2 supports fp32 and bf16"),
        ({"compile": True}, "tp 2 with compile is not supported"),
    ],
)
def test_settings_tp_cannot_honour_are_refused(tmp_path, settings, message):
    from bunmyaku.training.adversarial import SAM
    from bunmyaku.training.plugins import EMA

    args = TrainArgs(output_dir=str(tmp_path), tp=2, **settings)
    with pytest.raises(ValueError, match=message):
        sharding.check_tensor_parallel_settings(args, [])
    defaults = TrainArgs(output_dir=str(tmp_path), tp=2)
    sharding.check_tensor_parallel_settings(defaults, [EMA(0.9), SAM(0.05)])  # the defaults pass, with plugins


@pytest.mark.distributed
def test_cli_generate_under_torchrun_with_tp_prints_the_one_process_text(shared_data, tmp_path):
    """``torchrun --nproc-per-node 2 -m bunmyaku generate --tp 2``: rank 0 prints what 1 process prints, greedy
    and sampled (rank 0 draws the seed for both processes when none is given; here it is given)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.parity.helpers import randomize

    transformers = require_module("transformers")
    import bunmyaku

    bunmyaku.Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(tmp_path)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    randomize(transformers.GPT2LMHeadModel(config), seed=0, scale=0.5).save_pretrained(tmp_path)
    verb = ["-m", "bunmyaku", "generate", "-m", str(tmp_path), "Once upon a time", "--max-new-tokens", "8", "--json"]
    sampled = ["--do-sample", "--top-k", "20", "--seed", "1"]
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> list[dict]:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout)  # one JSON document: rank 1 prints nothing

    for extra in ([], sampled):
        one = run(*verb, *extra)
        checked = ["-m", "tests.training.cli_checked", *verb[2:]]  # and no process group outlives the command
        assert run(*torchrun, *checked, *extra, "--tp", "2") == one
        assert one[0]["generated_text"]


@pytest.mark.distributed
def test_resume_from_a_tensor_parallel_checkpoint(runs):
    """The sharded (DCP) checkpoint of a tp 2 run: resumed on 2 processes, the uninterrupted run's weights bit for
    bit and its losses after the checkpoint; resumed on 1 process (resharded), the 1-process run's."""
    shards = sorted(p.name for p in (runs / "resumed-two" / "checkpoints" / "step-00000002" / "shards").iterdir())
    assert len(shards) == 2  # one file per process: each wrote its halves of the split weights
    _assert_same_weights(runs / "resumed-two", runs / "gpt2-two", atol=0.0)
    assert [r for r in _losses(runs / "resumed-two") if r[0] > 2] == [r for r in _losses(runs / "gpt2-two") if r[0] > 2]
    _assert_same_weights(runs / "resumed-one", runs / "gpt2-one", atol=SPLIT_ATOL)
    _assert_same_losses(
        [r for r in _losses(runs / "resumed-one") if r[0] > 2], [r for r in _losses(runs / "gpt2-one") if r[0] > 2]
    )


def test_a_wrapped_projection_is_refused():
    """A projection that is not a plain linear (as a LoRA adapter wraps it) has no column / row split."""
    from tests.training.helpers import tiny_gpt2

    model = tiny_gpt2()
    attn = model.backbone.layers[1].attn
    attn.q_proj = torch.nn.Sequential(attn.q_proj)
    with pytest.raises(ValueError, match="tp: attn.q_proj is a Sequential, not a linear layer"):
        sharding.check_tensor_parallel(model, 2, 2, "ddp")
