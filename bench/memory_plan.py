"""The memory planner against measurement: predicted vs measured bytes of one CPU training step, per component.

    python -m bench.memory_plan            # the table for BENCHMARKS.md (about a minute on 2 cores)

Measured with PyTorch's own tracker (``torch.distributed._tools.mem_tracker.MemTracker``, a dispatch mode that
follows every tensor storage from allocation to release, by category): a random-weight model runs two training
steps as the Trainer runs them (the objective, backward, fused AdamW, ``zero_grad(set_to_none=True)``); the second
is measured, so the optimizer state exists throughout, as in every step but the first.

- parameters, gradients, optimizer: the bytes of the parameters, of the ``.grad`` tensors after the backward pass,
  and of the optimizer's state tensors;
- activations: at the peak of the forward and backward passes, everything that is not a parameter, gradient,
  optimizer state or buffer (the tensors saved for backward and the backward's temporaries);
- total: the peak of the whole step.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.machine import describe
from bunmyaku.models.auto import model_class
from bunmyaku.training.memory import DEFAULT_LORA_TARGETS, plan_memory
from bunmyaku.training.objectives import CausalLM, MaskedLM
from bunmyaku.training.plugins import Freeze

FIELDS = ("parameters", "gradients", "optimizer", "activations", "total")


@dataclass
class Setting:
    """One row: a model config (HF ``config.json`` dict), a task and the step's options (:func:`measure` runs one
    process, with gradient accumulation over ``grad_accum`` micro-batches of ``batch_size`` and LoRA adapters; the
    sharding options are the planner's, for bench/ladder.py's rungs)."""

    name: str
    config: dict[str, Any]
    task: str
    batch_size: int
    max_length: int
    checkpointing: bool = False
    freeze_layers: int = 0
    num_labels: int | None = None
    lora_r: int = 0
    lora_targets: str | None = None
    strategy: str = "ddp"
    world_size: int = 1
    grad_accum: int = 1
    tp: int = 1
    lora_quantize: str | None = None


def _batch(setting: Setting, vocab_size: int) -> dict[str, torch.Tensor]:
    B, T = setting.batch_size, setting.max_length
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (B, T), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}
    if setting.task == "causal-lm":
        batch["labels"] = ids.clone()
    elif setting.task == "masked-lm":
        labels = torch.full((B, T), -100)
        picked = torch.rand(B, T, generator=generator).argsort(-1)[:, : max(1, round(0.15 * T))]
        labels.scatter_(1, picked, ids.gather(1, picked))
        batch["labels"] = labels
    elif setting.task == "token-classification":
        batch["labels"] = torch.randint(0, setting.num_labels or 2, (B, T), generator=generator)
    else:
        batch["labels"] = torch.randint(0, setting.num_labels or 2, (B,), generator=generator)
    return batch


def _loss(model: torch.nn.Module, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's loss as the Trainer computes it: the pretraining objectives, or the head's own loss."""
    if task in ("causal-lm", "masked-lm"):
        objective = CausalLM() if task == "causal-lm" else MaskedLM()
        losses, _ = objective(model, batch)
        return sum(losses.values()) / max(1, sum(objective.count(batch).values()))
    return model(**batch).loss


class _NoHook:
    def remove(self) -> None:
        pass


def tracker(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """A ``MemTracker`` following ``model`` and ``optimizer`` (enter it around what is measured; bench/ladder.py uses
    it inside the Trainer). It hooks every parameter to see its gradient, which PyTorch refuses for frozen ones (they
    have no gradient to see): those are marked as hooked already."""
    from torch.distributed._tools.mem_tracker import MemTracker

    found = MemTracker()
    for param in model.parameters():
        if not param.requires_grad:
            found._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    found.track_external(model, optimizer)
    return found


def measure(setting: Setting) -> dict[str, int]:
    """Bytes of one fp32 training step of ``setting`` on the CPU (see the module notes)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    if setting.world_size > 1 or setting.tp > 1:
        raise ValueError(f"{setting.name}: measure() runs one process; bench/ladder.py runs several")

    torch.manual_seed(0)
    cls = model_class(setting.config["model_type"], setting.task)
    overrides = {} if setting.num_labels is None else {"num_labels": setting.num_labels}
    model = cls(cls.configure(setting.config, **overrides)).train()
    if setting.checkpointing:
        model.gradient_checkpointing_enable()
    if setting.lora_r:  # as `bunmyaku finetune --lora-r` does (tasks/finetune.py): adapters, base frozen
        from bunmyaku.models.lora import add_lora
        from bunmyaku.models.quantize import quantize_base
        from bunmyaku.tasks.finetune import FinetuneArgs

        targets = setting.lora_targets or DEFAULT_LORA_TARGETS[setting.config["model_type"]]
        if setting.lora_quantize:
            quantize_base(model, setting.lora_quantize)
        add_lora(model, setting.lora_r, FinetuneArgs.lora_alpha, targets.split(","))
    freeze = Freeze(False, setting.freeze_layers)
    for name, param in model.named_parameters():
        if freeze.should_freeze(name):
            param.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)  # as training/optim.py builds it on the CPU
    batch = _batch(setting, model.config.vocab_size)

    def step(watching: MemTracker | None = None) -> tuple[dict, int]:
        for _ in range(setting.grad_accum):  # the Trainer's accumulation: each micro-batch's backward adds to .grad
            loss = _loss(model, setting.task, batch) / setting.grad_accum
            loss.backward()
            if watching is not None:  # the tracker refuses a second forward of the root module per window otherwise
                watching.reset_mod_stats()
        grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        peak = watching.get_tracker_snapshot("peak") if watching is not None else {}
        return peak, grads

    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    backward_tracker = tracker(model, optimizer)
    with backward_tracker:
        peak, grads = step(backward_tracker)
    step_tracker = tracker(model, optimizer)
    with step_tracker:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    cpu = torch.device("cpu")
    at_peak = peak[cpu]
    states = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    activations = sum(at_peak[kind] for kind in (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH) if kind in at_peak)
    return {
        "parameters": parameter_bytes(model),
        "gradients": grads,
        "optimizer": states,
        "activations": activations,
        "total": max(at_peak["Total"], step_tracker.get_tracker_snapshot("peak")[cpu]["Total"]),
    }


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters; a quantized weight's with its quantization statistics, which bitsandbytes
    keeps beside the parameter (counted from its tensors by models/quantize.py's ``weight_bytes``)."""
    from bunmyaku.models.quantize import quantized_layers, weight_bytes

    extra = sum(weight_bytes(m) - m.weight.nbytes for m in quantized_layers(model).values())
    return sum(p.nbytes for p in model.parameters()) + extra


def predict(setting: Setting) -> dict[str, int]:
    """The planner's bytes for ``setting`` (fp32, CPU kernels), from its config.json."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(setting.config), encoding="utf-8")
        plan = plan_memory(
            path,
            setting.task,
            setting.batch_size,
            setting.max_length,
            checkpointing=setting.checkpointing,
            freeze_layers=setting.freeze_layers,
            num_labels=setting.num_labels,
            lora_r=setting.lora_r,
            lora_targets=setting.lora_targets,
            strategy=setting.strategy,
            world_size=setting.world_size,
            grad_accum_steps=setting.grad_accum,
            tp=setting.tp,
            lora_quantize=setting.lora_quantize,
            device="cpu",
        )
    return plan.as_dict()


def bert_config(hidden: int, layers: int, heads: int, vocab: int = 30522, dropout: float = 0.1) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }


def gpt2_config(hidden: int, layers: int, heads: int, vocab: int = 50257) -> dict[str, Any]:
    return {"model_type": "gpt2", "vocab_size": vocab, "n_embd": hidden, "n_layer": layers, "n_head": heads}


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int = 49152) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": int(8 * hidden / 3),
        "tie_word_embeddings": True,
    }


BERT_BASE = bert_config(768, 12, 12)
BERT_SMALL = bert_config(256, 4, 4)
GPT2_SMALL = gpt2_config(384, 6, 6)
LLAMA_SMALL = llama_config(384, 6, 6, 2)
SETTINGS = [
    Setting("BERT-base, classification", BERT_BASE, "sequence-classification", 8, 128, num_labels=2),
    Setting("BERT-small, classification", BERT_SMALL, "sequence-classification", 16, 256, num_labels=2),
    Setting("BERT-small, cls, checkpointing", BERT_SMALL, "sequence-classification", 16, 256, True, 0, 2),
    Setting("BERT-small, cls, freeze 2", BERT_SMALL, "sequence-classification", 16, 256, False, 2, 2),
    Setting("BERT-small, masked LM", BERT_SMALL, "masked-lm", 16, 128),
    Setting("GPT-2 6x384, causal LM", GPT2_SMALL, "causal-lm", 4, 256),
    Setting("GPT-2 6x384, LM, checkpointing", GPT2_SMALL, "causal-lm", 4, 256, True),
    Setting("Llama 6x384 (GQA 6/2), causal LM", LLAMA_SMALL, "causal-lm", 4, 256),
    Setting("Llama 6x384 (GQA 6/2), LM, freeze 3", LLAMA_SMALL, "causal-lm", 4, 256, False, 3),
    Setting("BERT-small, cls, LoRA r=8", BERT_SMALL, "sequence-classification", 16, 256, num_labels=2, lora_r=8),
    *(
        Setting(
            f"BERT-small, cls, QLoRA {q}",
            BERT_SMALL,
            "sequence-classification",
            16,
            256,
            num_labels=2,
            lora_r=8,
            lora_quantize=q,
        )
        for q in ("nf4", "int8")
    ),
    Setting("Llama 6x384, LM, QLoRA nf4", LLAMA_SMALL, "causal-lm", 4, 256, lora_r=8, lora_quantize="nf4"),
]


def main() -> None:
    print(
        "| setting | B x T | params MB | grads MB | optimizer MB | activations MB (pred / meas) "
        "| peak MB (pred / meas) |"
    )
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    started = time.perf_counter()
    for setting in SETTINGS:
        predicted, measured = predict(setting), measure(setting)
        exact = all(predicted[k] == measured[k] for k in ("parameters", "gradients", "optimizer"))
        act_error = predicted["activations"] / measured["activations"] - 1
        total_error = predicted["total"] / measured["total"] - 1
        worst = max(worst, abs(act_error), abs(total_error))
        mb = 2**20
        print(
            f"| {setting.name} | {setting.batch_size} x {setting.max_length} | {predicted['parameters'] / mb:.1f} | "
            f"{predicted['gradients'] / mb:.1f} | {predicted['optimizer'] / mb:.1f} | "
            f"{predicted['activations'] / mb:.1f} / {measured['activations'] / mb:.1f} ({act_error:+.1%}) | "
            f"{predicted['total'] / mb:.1f} / {measured['total'] / mb:.1f} ({total_error:+.1%}) |"
            + ("" if exact else " counts differ!")
        )
    seconds = time.perf_counter() - started
    print(f"\nworst relative error (activations, peak): {worst:.1%}; fp32; {describe()}; {seconds:.0f} s")


if __name__ == "__main__":
    main()
