"""``finetune`` and ``cv`` under torchrun (2 gloo processes on CPU) against 1 process with the same global batch.

Two launches serve every test (see tests/finetune/run_distributed.py): torchrun's 2 processes with batch 4 each,
then 1 process with batch 8. The oracle is the single process: no process group at all. The tiny model has no
dropout, so the only difference between the two is how the batches are split and the gradients reduced.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.training.test_distributed import _free_port, _start, _wait

SCRIPT = ["-m", "tests.finetune.run_distributed"]
RESULTS = ("metrics.json", "predictions.jsonl", "model/finetune.json", "model/README.md")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune-dist")
    with open(out / "one.log", "w+b") as log:  # first: it writes the tiny model both runs start from
        code = _wait(_start([*SCRIPT, str(out), "one"], log), 240)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-4000:]
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    with open(out / "two.log", "w+b") as log:
        code = _wait(_start([*torchrun, *SCRIPT, str(out), "two"], log), 240)
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-4000:]
    return out


def _metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_with_the_doubled_batch(runs, strategy):
    got, expected = runs / "two" / strategy, runs / "one" / strategy
    weights, reference = load_file(got / "model/model.safetensors"), load_file(expected / "model/model.safetensors")
    initial = load_file(runs / "tiny" / "model.safetensors")
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        assert (weights[name] - tensor).abs().max().item() < 1e-5, name
    # the weights did move (by far more than the tolerance), so the comparison means something
    pairs = [(k, i) for k in reference for i in initial if k.endswith(i) and reference[k].shape == initial[i].shape]
    assert len(pairs) >= len(initial) - 2  # the encoder's tensors (the checkpoint has no head)
    moved = max((reference[k] - initial[i]).abs().max().item() for k, i in pairs)
    assert moved > 1e-3
    metrics, expected_metrics = _metrics(got), _metrics(expected)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        if isinstance(value, float):
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
        elif key != "history":
            assert metrics[key] == value, key
    assert [r["label"] for r in _jsonl(got / "predictions.jsonl")] == [
        r["label"] for r in _jsonl(expected / "predictions.jsonl")
    ]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.distributed
def test_only_process_zero_writes_the_results_once(runs):
    writes = [json.loads((runs / "two" / f"writes-rank{r}.json").read_text()) for r in (0, 1)]
    assert writes[1] == []  # process 1 wrote no result file at all
    for strategy in ("ddp", "fsdp"):
        for name in RESULTS:
            assert writes[0].count(str(runs / "two" / strategy / name)) == 1, (strategy, name)
        log = (runs / "two" / strategy / "finetune.log").read_text()
        assert log.count("Done: ") == 1  # one process's story, not two interleaved
    for name in ("oof.jsonl", "fold_metrics.json", "metrics.json"):
        assert writes[0].count(str(runs / "two" / "cv" / name)) == 1, name


@pytest.mark.distributed
def test_cv_on_two_processes_gives_the_single_process_out_of_fold_scores(runs):
    got, expected = _jsonl(runs / "two" / "cv" / "oof.jsonl"), _jsonl(runs / "one" / "cv" / "oof.jsonl")
    assert [r["row"] for r in got] == [r["row"] for r in expected]
    assert [r["fold"] for r in got] == [r["fold"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
        assert a["label"] == b["label"]
    assert (runs / "two" / "cv" / "fold1" / "model" / "model.safetensors").is_file()


def test_the_batch_plan_deals_each_global_batch_out_by_rank():
    """Process r of W takes rows r, r + W, ... of each global batch: the shares partition it, none is empty."""
    from bunmyaku.tasks.base import BatchPlan, GroupedBatches

    features = [{"input_ids": [1] * (3 + i % 7)} for i in range(43)]  # 5 global batches of 8 and one of 3
    single = BatchPlan(GroupedBatches(features, 8, shuffle=True, seed=3), list)
    plans = [BatchPlan(GroupedBatches(features, 8, shuffle=True, seed=3), list, r, 2) for r in (0, 1)]
    assert single.batches_per_epoch == plans[0].batches_per_epoch == 6
    for _ in range(2 * single.batches_per_epoch):  # two epochs: the regrouping too
        whole = [f["index"] for f in single.next_batch()]
        shares = [[f["index"] for f in plan.next_batch()] for plan in plans]
        assert all(shares) and sorted(shares[0] + shares[1]) == sorted(whole)
        assert not set(shares[0]) & set(shares[1])
    # 37 rows in global batches of 12: the last one (1 row) would leave 3 of 4 processes empty, so it is skipped
    four = [BatchPlan(GroupedBatches(features[:37], 12, shuffle=True, seed=3), list, r, 4) for r in range(4)]
    assert four[0].batches_per_epoch == 3
    for _ in range(6):
        assert all(len(plan.next_batch()) == 3 for plan in four)
