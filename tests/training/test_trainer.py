"""The Trainer's loop: accumulation equals the full batch, schedules, precision, plugins, checkpoints, outputs."""

from __future__ import annotations

import math

import pytest
import torch

from bunmyaku.data import CausalLMCollator, MaskingCollator, PackedBlocks
from bunmyaku.training import EMA, Freeze, Plugin, TrainArgs, Trainer
from bunmyaku.training.args import field_docs
from bunmyaku.training.checkpoint import list_checkpoints
from bunmyaku.training.optim import lr_multiplier
from tests.training.helpers import CLS, EOS, MASK, PAD, SEP, VOCAB, Plan, random_split, tiny_bert, tiny_gpt2


def _args(tmp_path, **kwargs) -> TrainArgs:
    defaults = dict(output_dir=str(tmp_path / "run"), progress=False, plot=False, resume=False, warmup_steps=0)
    return TrainArgs(**{**defaults, **kwargs})


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mlm_batch(n: int, seed: int):
    blocks = PackedBlocks(random_split(seed=seed), 14, SEP, prefix=[CLS], suffix=[SEP])
    collator = MaskingCollator(VOCAB, MASK, PAD, [CLS, SEP, PAD, MASK], mlm_probability=0.3, seed=seed)
    return collator([blocks[i] for i in range(n)], epoch=0, indices=range(n))


def test_accumulated_micro_batches_give_the_full_batch_gradient(tmp_path):
    # 4 micro-batches of 3 with unequal numbers of masked tokens vs one batch of 12
    micro = [_mlm_batch(3, seed) for seed in range(4)]
    counts = [int((b["labels"] != -100).sum()) for b in micro]
    assert len(set(counts)) > 1
    full = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}

    grads = []
    for batches, accum in ((micro, 4), ([full], 1)):
        trainer = Trainer(
            tiny_bert(), _args(tmp_path, grad_accum_steps=accum, batch_size=1), [0], collator=lambda *a, **k: None
        )
        trainer._setup()
        trainer._train_step(batches)
        grads.append(_grads(trainer.model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)

    # the per-micro-batch mean that transformers used to average is measurably different
    model = tiny_bert()
    for b in micro:
        (model(**b).loss / 4).backward()
    naive = _grads(model)
    name = "backbone.embed.tokens.weight"
    assert not torch.allclose(naive[name], grads[1][name], rtol=1e-3, atol=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    args = TrainArgs(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    values = [lr_multiplier(s, args) for s in range(101)]
    assert values[0] > 0 and values[9] < values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[100] == pytest.approx(0.1)
    linear = TrainArgs(max_steps=100, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_multiplier(50, linear) == pytest.approx(0.5)


def test_no_weight_decay_on_biases_and_norms(tmp_path):
    trainer = Trainer(tiny_gpt2(), _args(tmp_path, weight_decay=0.1, batch_size=1), [0], collator=lambda *a, **k: None)
    trainer._setup()
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])


def _clm_data():
    return PackedBlocks(random_split(), 16, EOS, random_offset=True), PackedBlocks(random_split(seed=1), 16, EOS)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    train, valid = _clm_data()
    args = _args(tmp_path, max_steps=4, batch_size=4, precision=precision, eval_every=0, save_every=0)
    model = tiny_gpt2()
    seen: dict[str, set[torch.dtype]] = {"train": set(), "eval": set()}

    def record(module, inputs, output):  # returns None: the output is left as it is
        seen["train" if module.training else "eval"].add(output.dtype)

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for module in linears:
        module.register_forward_hook(record)
    trainer = Trainer(model, args, train, valid, CausalLMCollator())
    metrics = trainer.fit()
    assert math.isfinite(metrics["eval_loss"])
    assert (trainer.scaler is not None) == (precision == "fp16")
    # autocast really ran the matrix products in half precision, in training and in evaluation
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen == {"train": {expected}, "eval": {expected}}
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the weights stay fp32 under autocast"


def test_a_run_writes_metrics_plot_checkpoints_and_keeps_last_and_best(tmp_path):
    train, valid = _clm_data()
    args = _args(tmp_path, max_steps=12, batch_size=4, lr=3e-3, eval_every=3, save_every=3, keep_last=2, plot=True)
    trainer = Trainer(tiny_gpt2(), args, train, valid, CausalLMCollator())
    metrics = trainer.fit()
    run = tmp_path / "run"
    assert {"eval_loss", "eval_perplexity", "eval_accuracy"} <= metrics.keys()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert (run / "metrics.jsonl").is_file() and (run / "loss_curves.png").stat().st_size > 1000
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()
    steps = [s for s, _ in list_checkpoints(run / "checkpoints")]
    best = trainer.best["step"]
    assert steps[-2:] == [9, 12] and set(steps) <= {best, 9, 12}
    assert best in steps


def test_ema_plugin_averages_weights_and_swaps_them_for_evaluation(tmp_path):
    train, _ = _clm_data()
    ema = EMA(decay=0.5)
    trainer = Trainer(
        tiny_gpt2(),
        _args(tmp_path, max_steps=3, batch_size=4, eval_every=0),
        train,
        None,
        CausalLMCollator(),
        plugins=[ema],
    )
    trainer._setup()
    name, param = next((n, p) for n, p in trainer.unwrapped_model.named_parameters() if n.endswith("q_proj.weight"))
    expected = param.detach().clone()
    for _ in range(3):
        trainer._train_step([trainer.train_stream.next_batch()])
        trainer._optimizer_step()
        expected = 0.5 * expected + 0.5 * param.detach()
    torch.testing.assert_close(ema.shadow[name], expected)
    live = param.detach().clone()
    with ema.evaluation_context(trainer):
        torch.testing.assert_close(param.detach(), expected)
    assert torch.equal(param.detach(), live)


def test_freezing_embeddings_and_lower_layers(tmp_path):
    train, _ = _clm_data()
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(
        tmp_path,
        max_steps=2,
        batch_size=4,
        eval_every=0,
        save_every=0,
        freeze_embeddings=True,
        freeze_layers=1,
        lr=1e-2,
    )
    Trainer(model, args, train, None, CausalLMCollator()).fit()
    for name, param in model.named_parameters():
        frozen = Freeze(True, 1).should_freeze(name)
        assert torch.equal(param, before[name]) == frozen, name


def test_every_train_arg_is_documented():
    docs = field_docs(TrainArgs)
    assert docs["max_steps"] == "Optimizer steps to run."
    assert all(docs.values())


def test_bad_args_name_the_value():
    with pytest.raises(ValueError, match="precision"):
        TrainArgs(precision="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainArgs(grad_accum_steps=0)


@pytest.mark.parametrize("task", ["masked-lm", "pretraining"])
def test_masked_only_logits_equal_the_full_logits_at_masked_positions(task):
    model = tiny_bert(task).eval()
    batch = _mlm_batch(3, seed=0)
    field = "logits" if task == "masked-lm" else "prediction_logits"
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        full = getattr(model(**inputs), field)
        cheap = getattr(model(**inputs, labels=batch["labels"], masked_only=True), field)
    scored = batch["labels"] != -100
    torch.testing.assert_close(cheap, full[scored])


def test_gradient_checkpointing_flag_trains_the_same(tmp_path):
    train, _ = _clm_data()
    grads = []
    for checkpointing in (False, True):
        args = _args(tmp_path, batch_size=4, gradient_checkpointing=checkpointing)
        trainer = Trainer(tiny_gpt2(), args, train, None, CausalLMCollator())
        trainer._setup()
        trainer._train_step([trainer.train_stream.next_batch()])
        grads.append(_grads(trainer.model))
    assert trainer.unwrapped_model.config.gradient_checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_compiled_model_and_loss_train_the_same(tmp_path):
    train, _ = _clm_data()
    results = []
    for compile in (False, True):
        args = _args(tmp_path, batch_size=4, compile=compile)
        trainer = Trainer(tiny_gpt2(), args, train, None, CausalLMCollator())
        trainer._setup()
        stats = trainer._train_step([trainer.train_stream.next_batch()])
        results.append((stats, _grads(trainer.model)))
    assert trainer.objective.token_sums is not type(trainer.objective).token_sums, "the loss was compiled"
    assert list(results[0][1]) == list(results[1][1]), "compiling keeps parameter names"
    torch.testing.assert_close(results[1][0]["lm"], results[0][0]["lm"], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_export_best_writes_the_checkpoint_with_the_lowest_eval_loss(tmp_path):
    from bunmyaku.hub import load_state_dict
    from bunmyaku.training import Plugin
    from bunmyaku.training.checkpoint import step_dir

    class Sabotage(Plugin):
        """Scramble the weights after step 5, so that the last evaluation is the worst."""

        def after_optimizer_step(self, trainer):
            if trainer.step == 4:  # counted before the loop increments it: this is the 5th update
                with torch.no_grad():
                    for param in trainer.unwrapped_model.parameters():
                        param.add_(torch.randn_like(param), alpha=5.0)

    train, valid = _clm_data()
    args = _args(
        tmp_path, max_steps=6, batch_size=4, lr=1e-2, eval_every=2, save_every=2, keep_last=1, export_best=True
    )
    trainer = Trainer(tiny_gpt2(), args, train, valid, CausalLMCollator(), plugins=[Sabotage()])
    trainer.fit()
    assert trainer.best["step"] == 4
    exported = load_state_dict(tmp_path / "run")
    saved = load_state_dict(step_dir(tmp_path / "run" / "checkpoints", 4))
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)


def test_causal_lm_objective_scores_each_position_against_the_next_token():
    from bunmyaku.training.objectives import CausalLM

    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    ids = torch.randint(4, VOCAB, (3, 9))
    labels = ids.clone()
    labels[0, 4] = -100  # an ignored target in the middle
    labels[1, -1] = -100  # and at the end
    batch = {"input_ids": ids, "labels": labels}
    objective = CausalLM()
    with torch.no_grad():
        sums, metrics = objective(model, batch)
        logits = model(input_ids=ids).logits
    count = objective.count(batch)["lm"]
    assert count == 3 * 8 - 2
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(sums["lm"], expected)
    with torch.no_grad():  # the model's own shifted loss (HF's convention) is the mean of the same terms
        torch.testing.assert_close(sums["lm"] / count, model(input_ids=ids, labels=labels).loss)
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)
    assert int(metrics["lm_correct"]) == int(hits.sum())


# ------------------------------------------------------------------------------------------------ selection


class _Scripted:
    """An evaluation callable that returns scripted values of ``metric`` and remembers the weights it saw."""

    def __init__(self, values, metric="score"):
        self.values, self.metric = iter(values), metric
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, trainer):
        assert not trainer.unwrapped_model.training
        self.seen[trainer.step] = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
        return {"loss": 1.0, self.metric: next(self.values)}


def _selecting(tmp_path, values, patience=0, max_steps=None, **kwargs):
    train, _ = _clm_data()
    evaluation = _Scripted(values)
    args = _args(tmp_path, max_steps=max_steps or len(values), batch_size=4, lr=1e-2, eval_every=1, save_every=0)
    trainer = Trainer(
        tiny_gpt2(),
        args,
        train,
        None,
        CausalLMCollator(),
        evaluate=evaluation,
        metric="score",
        patience=patience,
        restore_best=True,
        export_dir=None,
        **kwargs,
    )
    trainer.fit()
    return trainer, evaluation


def _weights_equal(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_early_stopping_and_the_best_weights_restored(tmp_path):
    """Scores 0.5, 0.8, 0.6, 0.4 with patience 2: stop at the 4th evaluation, end with the 2nd one's weights."""
    trainer, evaluation = _selecting(tmp_path, [0.5, 0.8, 0.6, 0.4, 0.9, 0.9], patience=2)
    assert trainer.step == 4 and trainer.stopped_early
    assert trainer.selected == {"step": 2, "eval_loss": 1.0, "eval_score": 0.8}
    assert _weights_equal(trainer.unwrapped_model, evaluation.seen[2])
    assert not _weights_equal(trainer.unwrapped_model, evaluation.seen[4])
    assert [r["step"] for r in trainer.history if "eval_score" in r] == [1, 2, 3, 4]


def test_lower_is_better_when_asked(tmp_path):
    trainer, evaluation = _selecting(tmp_path, [0.5, 0.8, 0.2, 0.4], greater_is_better=False)
    assert trainer.selected["step"] == 3 and _weights_equal(trainer.unwrapped_model, evaluation.seen[3])
    for metric, greater in (("loss", False), ("mse", False), ("perplexity", False), ("spearman", True)):
        assert Trainer(tiny_gpt2(), _args(tmp_path), [0], collator=list, metric=metric).greater_is_better is greater


def test_an_undefined_metric_is_no_improvement(tmp_path):
    from bunmyaku.hub.files import write_json_atomic

    trainer, evaluation = _selecting(tmp_path, [None, 0.3, None, 0.2])
    assert trainer.selected["step"] == 2 and _weights_equal(trainer.unwrapped_model, evaluation.seen[2])
    logged = [r for r in trainer.history if "eval_loss" in r]
    assert "eval_score" not in logged[0] and logged[1]["eval_score"] == 0.3  # the training log: absent
    assert [e["score"] for e in trainer.evaluations] == [None, 0.3, None, 0.2]  # metrics.json's history: null
    write_json_atomic("/dev/null", {"history": trainer.evaluations})  # None is valid JSON; NaN would not be


def test_a_metric_never_defined_keeps_the_first_evaluation(tmp_path):
    trainer, evaluation = _selecting(tmp_path, [None, None])
    assert trainer.selected["step"] == 1 and trainer.selected["eval_score"] is None
    assert _weights_equal(trainer.unwrapped_model, evaluation.seen[1])


def test_a_non_finite_metric_stops_the_run(tmp_path):
    from bunmyaku.training.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"evaluation's score at step 2: not finite"):
        _selecting(tmp_path, [0.1, math.nan])
    with pytest.raises(ValueError, match=r"metric 'score' is not computed by the evaluation; available: \['loss'\]"):
        train, _ = _clm_data()
        args = _args(tmp_path, max_steps=1, batch_size=4, save_every=0)
        Trainer(
            tiny_gpt2(), args, train, None, CausalLMCollator(), evaluate=lambda t: {"loss": 1.0}, metric="score"
        ).fit()


def test_a_batch_plan_feeds_ready_batches_and_its_position_is_checkpointed(tmp_path):
    train, _ = _clm_data()
    collate = CausalLMCollator()
    batches = [collate([train[i] for i in range(j, j + 3 + j)], epoch=0, indices=[]) for j in range(3)]
    plan = Plan(batches)
    seen = []

    class Look(Plugin):
        def before_backward(self, trainer, loss):
            seen.append(trainer._step_batches[0]["input_ids"].shape[0])

    args = _args(tmp_path, max_steps=4, save_every=2, keep_last=5, eval_every=0)
    Trainer(tiny_gpt2(), args, plan, plugins=[Look()], export_dir=None).fit()
    assert seen == [3, 4, 5, 3], "the plan's batches, whole and in order (sizes 3, 4, 5)"
    from bunmyaku.training.checkpoint import read_checkpoint, step_dir

    state = read_checkpoint(tiny_gpt2(), step_dir(tmp_path / "run" / "checkpoints", 2)).state
    assert state["data"] == {"position": 2}
    assert not (tmp_path / "run" / "model.safetensors").exists(), "export_dir=None: no model written"
