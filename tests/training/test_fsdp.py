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
from tests.training.run_fsdp import SHARDED_PLUGINS
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


def _grad_norms(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if "grad_norm" in r]


def _assert_same_losses(got, expected, tol=1e-6):
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in expected]
    torch.testing.assert_close([v for *_, v in got], [v for *_, v in expected], rtol=tol, atol=tol)


@pytest.mark.distributed
def test_fsdp_on_two_processes_matches_one_process(runs):
    """Accumulation (2 micro-batches), gradient checkpointing and clipping on; weights gathered at the export."""
    single, fsdp = runs / "single", runs / "fsdp"
    assert len(_losses(single)) >= 4  # training logs at steps 1, 3, 6 and evaluations at 3, 6
    _assert_same_losses(_losses(fsdp), _losses(single))
    _assert_same_weights(fsdp, single)
    # clipping acted (norms above max_grad_norm 0.3) on the norm over every shard, not this process's slice
    norms = [_grad_norms(run) for run in (fsdp, single)]
    assert min(norms[1]) > 0.3
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
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
@pytest.mark.parametrize("plugin", SHARDED_PLUGINS)
def test_plugins_under_fsdp_match_one_process(runs, plugin):
    """EMA and SWA average each process's shards; FGM, AWP, SAM and ASAM perturb by norms over every shard and run
    their second pass sharded: 2 processes with half the batch give the losses and exported weights (the average
    for EMA and SWA) of 1 process with the whole batch."""
    two, one = runs / f"{plugin}2", runs / f"{plugin}1"
    _assert_same_losses(_losses(two), _losses(one))
    _assert_same_weights(two, one)
    # the plugin changed the run (EMA and SWA only their export: the average, not the last iterate, which is the
    # plain run's), by far more than the tolerance above
    with_plugin, plain = load_file(one / "model.safetensors"), load_file(runs / "single" / "model.safetensors")
    assert max(float((with_plugin[k] - plain[k]).abs().max()) for k in plain) > 1e-3
    if plugin in ("ema", "swa"):  # the average travels through DCP in every process's shard file, not in the JSON
        folder = two / "checkpoints" / "step-00000006"
        saved = json.loads((folder / "trainer_state.json").read_text())["state"]["plugins"][0]
        stubs = saved["shadow" if plugin == "ema" else "average"]
        assert stubs and all(set(stub) == {sharding.PLUGIN_TENSOR} for stub in stubs.values())
        for shard in (folder / "shards").iterdir():
            with safe_open(shard, "pt") as f:
                assert any(key.startswith("plugins.0.") for key in f.keys()), shard.name


@pytest.mark.distributed
@pytest.mark.parametrize("plugin", ["ema", "sam"])
def test_plugins_under_hsdp_match_one_process(runs, plugin):
    """On hsdp's (replicate, shard) mesh the averages are sharded in 2-D and the norms reduced over both dimensions."""
    _assert_same_losses(_losses(runs / f"{plugin}-hsdp2"), _losses(runs / f"{plugin}1"))
    _assert_same_weights(runs / f"{plugin}-hsdp2", runs / f"{plugin}1")
    with_plugin, plain = (
        load_file(runs / f"{plugin}-hsdp2" / "model.safetensors"),
        load_file(runs / "hsdp" / "model.safetensors"),
    )
    assert max(float((with_plugin[k] - plain[k]).abs().max()) for k in plain) > 1e-3  # EMA: the average was exported


@pytest.mark.distributed
def test_ema_resumes_exactly_from_a_sharded_checkpoint(runs):
    """EMA's sharded average is saved by each process and read back into the shards: interrupted during step 4 and
    resumed from the step-3 checkpoint, the export (the average) is the uninterrupted run's, bit for bit; 1 process
    resuming that 2-process checkpoint (the average resharded) continues like the 1-process run."""
    _assert_same_weights(runs / "ema-resumed2", runs / "ema2", atol=0.0)
    assert [r for r in _losses(runs / "ema-resumed2") if r[0] > 3] == [r for r in _losses(runs / "ema2") if r[0] > 3]
    _assert_same_weights(runs / "ema-resumed1", runs / "ema1")


@pytest.mark.distributed
def test_bf16_mixed_precision_trains_close_to_fp32(runs):
    """bf16 weights for compute, fp32 reduction and fp32 sharded master weights (the export stays fp32): the
    losses follow the fp32 run's to bf16's precision, not exactly."""
    bf16, fp32 = _losses(runs / "bf16"), _losses(runs / "fsdp")
    assert [(s, k) for s, k, _ in bf16] == [(s, k) for s, k, _ in fp32]
    gaps = [abs(a - b) for (*_, a), (*_, b) in zip(bf16, fp32, strict=True)]
    assert max(gaps) < 1e-2 and max(gaps) > 0
    assert all(t.dtype == torch.float32 for t in load_file(runs / "bf16" / "model.safetensors").values())


@pytest.mark.distributed
def test_restore_best_gathers_and_restores_the_selected_weights(runs):
    """The selected evaluation's weights are gathered whole (rank 0), kept in the checkpoints, broadcast back into
    the shards at the end and exported: as in 1 process, and not the last step's weights."""
    assert [r for r in _losses(runs / "best2")] == [r for r in _losses(runs / "fsdp")]  # the same training
    _assert_same_weights(runs / "best2", runs / "best1")
    best, last = load_file(runs / "best1" / "model.safetensors"), load_file(runs / "single" / "model.safetensors")
    assert max(float((best[k] - last[k]).abs().max()) for k in last) > 1e-3


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


@pytest.mark.gpu
def test_cpu_offload_on_two_gpus_matches_keeping_everything_on_the_gpus(tmp_path):
    """Parameters, gradients and AdamW state on the host (CPUOffloadPolicy), the optimizer step on the CPU: the
    same run as with everything on the GPUs, to the two devices' float32 rounding."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices (one per process)")
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    with open(tmp_path / "cuda.log", "w+b") as log:
        code = _wait(_start([*torchrun, *SCRIPT, str(tmp_path), "cuda"], log), 300)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-4000:]
    _assert_same_losses(_losses(tmp_path / "offload"), _losses(tmp_path / "cuda"), tol=1e-4)
    _assert_same_weights(tmp_path / "offload", tmp_path / "cuda", atol=1e-4)
    assert _losses(tmp_path / "cuda")[-1][2] < _losses(tmp_path / "cuda")[0][2]


# ---------------------------------------------------------------------------------------------- in one process


def _args(tmp_path, **settings):
    defaults = {"max_steps": 2, "lr": 3e-3, "eval_every": 0, "keep_last": 3, "strategy": "fsdp"}
    return TrainArgs(
        output_dir=str(tmp_path),
        batch_size=4,
        warmup_steps=0,
        save_every=1,
        device="cpu",
        progress=False,
        plot=False,
        **{**defaults, **settings},
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
        ({"cpu_offload": True}, "already on the CPU"),
        ({"strategy": "zero"}, "strategy must be one of ddp, fsdp, hsdp"),
        ({"strategy": "ddp", "cpu_offload": True}, "cpu_offload needs strategy fsdp or hsdp"),
        ({"precision": "fp16"}, "supports fp32 and bf16"),
    ],
)
def test_settings_sharding_cannot_honour_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, **settings).fit()


def _tiny(name):
    from bunmyaku.models.bert import BertConfig, BertForMaskedLM
    from bunmyaku.models.llama import LlamaConfig, LlamaForCausalLM
    from tests.training.helpers import tiny_gpt2

    torch.manual_seed(0)
    if name == "gpt2":
        return tiny_gpt2()
    if name == "bert":
        return BertForMaskedLM.from_config(BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4))
    config = LlamaConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=37)
    return LlamaForCausalLM.from_config(config)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_the_export_copy_rebuilds_the_model_from_its_gathered_weights(name):
    """The export builds a plain model on the meta device from the gathered state: tied weights re-tied and the
    buffers no state dict holds (Llama's rotary frequencies, position tables) taken from the running model."""
    model = _tiny(name).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copy = sharding._plain_copy(model, state).eval()
    assert type(copy) is type(model)
    ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert sorted(copy.hf_state_dict()) == sorted(model.hf_state_dict())


def test_export_best_reads_the_best_sharded_checkpoint(tmp_path):
    """export_best with sharded checkpoints: the exported weights are the best checkpoint's (step 3 of 4 here: a
    learning rate of 1 overshoots at step 4), read straight from its safetensors shard as the oracle."""
    from bunmyaku import from_pretrained
    from bunmyaku.data import PackedBlocks
    from tests.training.helpers import EOS, random_split

    trainer = _trainer(tmp_path, max_steps=4, lr=1.0, eval_every=1, keep_last=5, export_best=True)
    trainer.eval_data = PackedBlocks(random_split(6, seed=1), 16, EOS)
    trainer.fit()
    assert trainer.best["step"] == 3 and trainer.step == 4
    (shard,) = (tmp_path / "checkpoints" / "step-00000003" / "shards").iterdir()
    saved = {k.removeprefix("model."): v for k, v in load_file(shard).items() if k.startswith("model.")}
    exported = from_pretrained(tmp_path).state_dict()
    assert saved.keys() <= exported.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    last = load_file(next((tmp_path / "checkpoints" / "step-00000004" / "shards").iterdir()))
    assert any(not torch.equal(last[f"model.{k}"], v) for k, v in saved.items())


def test_export_best_with_ema_exports_that_checkpoints_average(tmp_path):
    """export_best with EMA and sharded checkpoints: the export is the best checkpoint's average (stored through DCP
    as ``plugins.0.shadow.<name>``, read straight from its shard as the oracle), not its weights nor the last one's."""
    from bunmyaku import from_pretrained
    from bunmyaku.data import PackedBlocks
    from tests.training.helpers import EOS, random_split

    settings = {"max_steps": 4, "lr": 1.0, "eval_every": 1, "keep_last": 5, "export_best": True, "ema_decay": 0.5}
    trainer = _trainer(tmp_path, **settings)
    trainer.eval_data = PackedBlocks(random_split(6, seed=1), 16, EOS)
    trainer.fit()
    assert trainer.best["step"] not in (None, 4)
    (shard,) = (tmp_path / "checkpoints" / f"step-{trainer.best['step']:08d}" / "shards").iterdir()
    stored = load_file(shard)
    average = {k.removeprefix("plugins.0.shadow."): v for k, v in stored.items() if k.startswith("plugins.0.")}
    exported = from_pretrained(tmp_path).state_dict()
    assert average and average.keys() <= exported.keys()
    for name, tensor in average.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(stored[f"model.{k}"], v) for k, v in average.items())  # not the weights themselves


def test_resuming_with_the_other_strategy_is_refused(tmp_path):
    """Sharded and whole-weight checkpoints differ in layout: a run with the other strategy says so instead of
    skipping them as damaged and silently starting afresh."""
    _trainer(tmp_path / "sharded").fit()
    with pytest.raises(ValueError, match="is a sharded checkpoint"):
        _trainer(tmp_path / "sharded", strategy="ddp", max_steps=3).fit()
    _trainer(tmp_path / "whole", strategy="ddp").fit()
    with pytest.raises(ValueError, match="was written with strategy ddp"):
        _trainer(tmp_path / "whole", max_steps=3).fit()


def test_perturbation_plugins_with_cpu_offload_are_refused(tmp_path):
    """FGM, AWP and SAM reduce norms over every shard: with cpu_offload those shards are in host memory, which NCCL
    cannot reduce; EMA and SWA (shard-local updates) are allowed. The check needs no GPU: it reads the device."""
    from bunmyaku.training.adversarial import AWP, FGM, SAM
    from bunmyaku.training.plugins import EMA, SWA

    args = _args(tmp_path, cpu_offload=True)
    cuda = torch.device("cuda")
    for plugin, name in ((FGM(1.0), "FGM"), (AWP(), "AWP"), (SAM(0.05, adaptive=True), "SAM")):
        with pytest.raises(ValueError, match=f"{name} is not supported with cpu_offload: its norms"):
            sharding.check_strategy(args, [plugin], cuda)
    sharding.check_strategy(args, [EMA(0.5), SWA(0.5)], cuda)
