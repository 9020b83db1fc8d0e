"""Sharded data parallelism (FSDP2 / HSDP on 2 gloo processes) and its checkpoints (DCP).

Two launches serve every distributed test (starting processes costs more than the tiny runs, see
tests/training/run_fsdp.py): torchrun's 2 processes train ``fsdp``, ``hsdp`` and an interrupted-then-resumed
run; then 1 process trains the uninterrupted reference and resumes the 2-process step-3 checkpoint. The oracle
is the single process with the whole batch (fp32, same global batch): no sharding at all.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bunmyaku.training import TrainArgs, Trainer, sharding
from bunmyaku.training import checkpoint as ckpt
from tests.conftest import require_module
from tests.training.test_distributed import _free_port, _start, _wait

SCRIPT = ["-m", "tests.training.run_fsdp"]
UNITS = 3  # fully_shard units of the tiny GPT-2: 2 blocks and the root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    with open(out / "two.log", "w+b") as log:
        code = _wait(_start([*torchrun, *SCRIPT, str(out), "two"], log), 240)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-4000:]
    with open(out / "one.log", "w+b") as log:
        code = _wait(_start([*SCRIPT, str(out), "one"], log), 240)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-4000:]
    return out


def _assert_same_weights(got_dir, expected_dir, atol=1e-5):
    got, expected = load_file(got_dir / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=atol, msg=name)


def _losses(run_dir):
    """(step, kind, loss) of every training log and evaluation in metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "eval" if "eval_loss" in r else "train", r.get("eval_loss", r.get("loss"))) for r in records]


def _assert_same_losses(got, expected):
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in expected]
    torch.testing.assert_close([v for *_, v in got], [v for *_, v in expected], rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
def test_fsdp_on_two_processes_matches_one_process(runs):
    """Accumulation (2 micro-batches), gradient checkpointing and clipping on; weights gathered at the export."""
    single, fsdp = runs / "single", runs / "fsdp"
    assert len(_losses(single)) >= 4  # training logs at steps 1, 3, 6 and evaluations at 3, 6
    _assert_same_losses(_losses(fsdp), _losses(single))
    _assert_same_weights(fsdp, single)
    # the run trained: the weights moved by far more than the tolerance
    first = load_file(runs / "single" / "model.safetensors")
    assert _losses(single)[-1][2] < _losses(single)[0][2]
    assert all(torch.isfinite(t).all() for t in first.values())


@pytest.mark.distributed
def test_hsdp_on_a_one_by_two_mesh_matches_one_process(runs):
    _assert_same_losses(_losses(runs / "hsdp"), _losses(runs / "single"))
    _assert_same_weights(runs / "hsdp", runs / "single")


@pytest.mark.distributed
def test_llrd_and_freezing_under_fsdp_match_one_process(runs):
    """LLRD's groups are built from the sharded parameters' names; frozen embeddings (and the tied head) stay as
    they were, in the root unit beside trainable norms."""
    _assert_same_losses(_losses(runs / "plugins2"), _losses(runs / "plugins1"))
    _assert_same_weights(runs / "plugins2", runs / "plugins1")
    from tests.training.helpers import tiny_gpt2

    start = tiny_gpt2().hf_state_dict()  # the runs' initial weights (seed 0)
    for run in ("plugins1", "plugins2"):
        trained = load_file(runs / run / "model.safetensors")
        assert torch.equal(trained["transformer.wte.weight"], start["transformer.wte.weight"]), run
        name = "transformer.h.0.attn.c_attn.weight"
        assert (trained[name] - start[name]).abs().max() > 1e-3, run


@pytest.mark.distributed
def test_accumulation_reduce_scatters_only_on_the_last_micro_batch(runs):
    """2 steps of 2 micro-batches: one reduce-scatter per unit per step, not per micro-batch."""
    assert json.loads((runs / "reduce_scatters.json").read_text()) == {"calls": 2 * UNITS}


@pytest.mark.distributed
def test_resume_on_two_processes_continues_identically(runs):
    """Interrupted during step 4, resumed from the sharded step-3 checkpoint: the weights of the uninterrupted
    run, bit for bit, and its losses after the checkpoint."""
    _assert_same_weights(runs / "resumed2", runs / "fsdp", atol=0.0)
    resumed = [r for r in _losses(runs / "resumed2") if r[0] > 3]
    assert resumed == [r for r in _losses(runs / "fsdp") if r[0] > 3]


@pytest.mark.distributed
def test_resume_on_one_process_from_a_two_process_checkpoint(runs):
    """Resharding: the checkpoint written by 2 processes (2 shard files) continues in 1 like the 1-process run."""
    shards = sorted(p.name for p in (runs / "resumed2" / "checkpoints" / "step-00000003" / "shards").iterdir())
    assert len(shards) == 2
    _assert_same_weights(runs / "resumed1", runs / "single")
    _assert_same_losses(
        [r for r in _losses(runs / "resumed1") if r[0] > 3], [r for r in _losses(runs / "single") if r[0] > 3]
    )


@pytest.mark.distributed
def test_sharded_checkpoints_hold_no_pickle(runs):
    """DCP's default writer pickles its .metadata (and torch.saves each tensor); ours are safetensors + JSON."""
    for folder in (runs / "fsdp" / "checkpoints").iterdir():
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert files == [
            "shards/shard-00001-model-00001-of-00001.safetensors",
            "shards/shard-00002-model-00001-of-00001.safetensors",
            "trainer_state.json",
            "trainer_state.safetensors",
        ]
        for shard in (folder / "shards").iterdir():
            with safe_open(shard, "pt") as f:  # parses as safetensors: a JSON header, then raw bytes
                assert any(key.startswith("optimizer.") for key in f.keys())


@pytest.mark.distributed
def test_export_loads_in_transformers(runs):
    require_module("transformers")
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(runs / "fsdp", output_loading_info=True)
    assert not any(info.values()), info
    reference = GPT2LMHeadModel.from_pretrained(runs / "single").eval()
    ids = torch.randint(10, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- in one process


def _args(tmp_path, **settings):
    return TrainArgs(
        output_dir=str(tmp_path),
        max_steps=2,
        batch_size=4,
        lr=3e-3,
        warmup_steps=0,
        save_every=1,
        keep_last=3,
        eval_every=0,
        device="cpu",
        progress=False,
        plot=False,
        **{"strategy": "fsdp", **settings},
    )


def _trainer(tmp_path, **settings):
    from bunmyaku.data import CausalLMCollator, PackedBlocks
    from tests.training.helpers import EOS, random_split, tiny_gpt2

    data = PackedBlocks(random_split(20), 16, EOS)
    return Trainer(tiny_gpt2(), _args(tmp_path, **settings), data, collator=CausalLMCollator())


def test_a_killed_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    original = dcp.save

    def dies_after_one_shard(state, storage_writer, no_dist):
        original(state, storage_writer=storage_writer, no_dist=no_dist)  # the shard files are written...
        if "step-00000002" in str(storage_writer.path):
            raise KeyboardInterrupt  # ...and the process dies before the checkpoint is complete

    monkeypatch.setattr(dcp, "save", dies_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path).fit()
    root = tmp_path / "checkpoints"
    assert not ckpt.step_dir(root, 2).exists()  # no half-written folder under a checkpoint's name
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [1]
    path, state = sharding.latest_readable(root)
    assert (path.name, state["step"]) == ("step-00000001", 1)
    monkeypatch.setattr(dcp, "save", original)
    trainer = _trainer(tmp_path)
    trainer.fit()  # resumes from step 1 and finishes
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [1, 2]
    assert not list(root.glob(".tmp-*"))


def test_a_cut_shard_is_skipped_for_the_checkpoint_before_it(tmp_path, caplog):
    _trainer(tmp_path).fit()
    root = tmp_path / "checkpoints"
    shard = next((root / "step-00000002" / "shards").iterdir())
    shard.write_bytes(shard.read_bytes()[:-100])
    path, _ = sharding.latest_readable(root)
    assert path.name == "step-00000001"
    assert "Skipping a damaged checkpoint" in caplog.text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ema_decay": 0.9}, "EMA is not supported with strategy fsdp"),
        ({"sam": 0.05}, "SAM is not supported with strategy fsdp"),
        ({"fgm": 1.0}, "FGM is not supported with strategy fsdp"),
        ({"cpu_offload": True}, "already on the CPU"),
        ({"strategy": "zero"}, "strategy must be one of ddp, fsdp, hsdp"),
        ({"strategy": "ddp", "cpu_offload": True}, "cpu_offload needs strategy fsdp or hsdp"),
        ({"precision": "fp16"}, "supports fp32 and bf16"),
    ],
)
def test_settings_sharding_cannot_honour_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, **settings).fit()
