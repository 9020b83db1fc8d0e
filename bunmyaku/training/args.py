"""``TrainArgs`` (every knob of the training loop) and ``PretrainArgs``, one documented field each.

The CLI flags and the YAML recipe keys are generated from this dataclass (see :func:`field_docs`), so a field
added here is a flag and a recipe key at once, with its docstring as the help text.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from functools import cache
from typing import ClassVar, Literal


@dataclass
class TrainArgs:
    """How to train: the loop, the optimizer and schedule, precision, evaluation, checkpoints and logging."""

    output_dir: str = "runs/train"
    """Folder for checkpoints, metrics.jsonl, the loss plot and the final model."""
    max_steps: int = 1000
    """Optimizer steps to run."""
    batch_size: int = 32
    """Examples per micro-batch on each process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (global batch = batch_size x grad_accum_steps x processes)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to the peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    weight_decay: float = 0.01
    """AdamW weight decay (never on biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (after unscaling); 0 disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, bf16 autocast, or fp16 autocast with a GradScaler."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    compile: bool = False
    """Compile the model's forward with torch.compile (in place: parameter names and checkpoints unchanged)."""
    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """Data parallelism under torchrun: ddp (a replica per process), fsdp (weights, gradients and optimizer state
    sharded over the processes; sharded checkpoints), hsdp (sharded within groups of shard_size, replicated across)."""
    shard_size: int = 0
    """hsdp: processes per shard group (0: the GPUs of one node; every process on the CPU)."""
    tp: int = 1
    """Tensor parallelism: split every block's attention heads and feed-forward width over groups of tp processes
    (torchrun's processes split into world / tp data-parallel replicas; with strategy fsdp those are sharded)."""
    cpu_offload: bool = False
    """fsdp / hsdp on CUDA: keep the sharded weights, gradients and optimizer state in host memory."""
    freeze_embeddings: bool = False
    """Do not train the embeddings."""
    freeze_layers: int = 0
    """Do not train the first N Transformer layers."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999) for eval and export; 0: off."""
    fgm: float = 0.0
    """FGM adversarial training: perturb the word embeddings by this norm along their gradient (e.g. 1.0); 0: off."""
    awp_lr: float = 0.0
    """AWP adversarial weight perturbation: step size relative to each weight matrix's norm (e.g. 1.0); 0: off."""
    awp_eps: float = 0.01
    """AWP: the largest relative change of any weight (|w| x awp_eps)."""
    awp_start_epoch: float = 0.0
    """AWP: the first epoch (0-based, fractions allowed) that is perturbed."""
    sam: float = 0.0
    """SAM sharpness-aware minimization: the neighbourhood radius rho (e.g. 0.05); 0: off. Doubles the step's cost."""
    sam_adaptive: bool = False
    """With sam: ASAM's scale-invariant neighbourhood (rho around 0.5 to 2)."""
    swa_start: float = 0.0
    """Stochastic weight averaging: evaluate and export the mean of every step's weights from this epoch on; 0: off."""
    swa_lr: float = 0.0
    """With swa_start: a constant learning rate from that epoch on (torch's SWALR; LLRD ratios kept); 0: schedule."""
    eval_every: int = 200
    """Evaluate every N steps (and at the end); 0: only at the end."""
    eval_batches: int = 0
    """Micro-batches per evaluation before the last step (the final one sees the whole held-out split); 0: all."""
    save_every: int = 500
    """Write a checkpoint every N steps (and at the end); 0: only at the end."""
    keep_last: int = 2
    """Checkpoints to keep, besides the best one."""
    export_best: bool = False
    """Export the saved checkpoint with the lowest eval loss instead of the last weights (an overfitting run)."""
    export_dtype: str | None = None
    """Store the exported weights in this dtype ("float16" halves a float32 model); default: as trained."""
    log_every: int = 10
    """Log the training loss every N steps."""
    seed: int = 0
    """Seed of the data order, masking and dropout."""
    device: str | None = None
    """cpu, cuda, ... (default: CUDA when available)."""
    num_threads: int = 0
    """torch.set_num_threads for CPU runs; 0: leave PyTorch's default."""
    resume: bool = True
    """Continue from the latest checkpoint in output_dir when there is one."""
    progress: bool = True
    """Draw a progress bar (rank 0)."""
    plot: bool = True
    """Write loss_curves.png next to metrics.jsonl at the end (needs matplotlib)."""

    # layer-wise learning rates and re-initialisation (plugins LLRD, ReinitLayers)
    llrd: float = 0.0
    """Layer-wise lr decay: head and top layer at lr, each layer below x DECAY, embeddings one step lower; 0: off."""
    reinit_layers: int = 0
    """Re-initialise the top N Transformer layers (the model's own init, the training seed) before training."""

    MIN_STEPS: ClassVar[int] = 1  # the smallest max_steps (0 means "all epochs" when fine-tuning)

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, low=self.MIN_STEPS)
        for name in ("batch_size", "grad_accum_steps", "log_every", "keep_last", "tp"):
            check_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "freeze_layers", "eval_every", "eval_batches", "save_every", "num_threads"):
            check_int(name, getattr(self, name), low=0)
        check_int("seed", self.seed)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("adam_beta1", self.adam_beta1, low=0.0, high=1.0, high_open=True)
        check_number("adam_beta2", self.adam_beta2, low=0.0, high=1.0, high_open=True)
        check_number("adam_eps", self.adam_eps, low=0.0, low_open=True)
        check_number("max_grad_norm", self.max_grad_norm, low=0.0)
        check_number("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        check_number("llrd", self.llrd, low=0.0, high=1.0)
        check_int("reinit_layers", self.reinit_layers, low=0)
        for name in ("fgm", "awp_lr", "awp_start_epoch", "sam"):
            check_number(name, getattr(self, name), low=0.0)
        check_number("awp_eps", self.awp_eps, low=0.0, low_open=True)
        if self.sam and (self.fgm or self.awp_lr):
            # SAM replaces the step's gradient by the one at its perturbed point, discarding FGM's / AWP's term
            raise ValueError("sam cannot be combined with fgm or awp_lr: choose one (fgm and awp_lr may be combined)")
        check_number("swa_start", self.swa_start, low=0.0)
        check_number("swa_lr", self.swa_lr, low=0.0)
        if self.swa_lr and not self.swa_start:
            raise ValueError("swa_lr is the learning rate of stochastic weight averaging: give swa_start too")
        if self.swa_start and self.ema_decay:
            # both replace the weights by an average for evaluation and export: one would silently win
            raise ValueError("swa_start and ema_decay both average the weights for evaluation and export: choose one")
        if self.sam_adaptive and not self.sam:
            raise ValueError("sam_adaptive needs sam > 0 (ASAM's rho, e.g. sam: 0.5)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")


@dataclass
class FinetuneTrainArgs(TrainArgs):
    """How to train when fine-tuning: TrainArgs with fine-tuning's defaults, the one source of them for the
    ``bunmyaku finetune`` command, its recipes and ``bunmyaku.finetune(...)`` in Python."""

    output_dir: str | None = None
    """Folder for the run's results: model/, metrics.json, predictions, log, plot (None in Python: none written)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all the epochs)."""
    lr: float = 5e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup: cosine, linear or constant."""
    eval_every: int = 0
    """Evaluate every N steps (0: at the end of every epoch), and at the end."""
    save_every: int = 0
    """Write a checkpoint every N steps, so that a killed run resumes exactly (0: no checkpoints)."""
    log_every: int = 20
    """Log the training loss every N steps (and at the first)."""
    resume: bool = True
    """Continue a killed run from the newest checkpoint in output_dir (written with save_every)."""

    MIN_STEPS: ClassVar[int] = 0


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite number in the given range.

    NaN passes every comparison test written the usual way (``nan < 0`` is False), so finiteness is checked
    first: a NaN or infinite learning rate would otherwise train to NaN weights without a word.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be a number, got {value!r}{hint}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_int(name: str, value: object, low: int | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an integer (not a float, not NaN) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


OBJECTIVE_TASKS = {"clm": "causal-lm", "mlm": "masked-lm", "mlm+nsp": "pretraining", "rtd": "base"}  # the export's


@dataclass
class PretrainArgs:
    """What to pretrain on what: objective, model, tokenizer, corpus and example construction."""

    objective: Literal["clm", "mlm", "mlm+nsp", "rtd"] = "clm"
    """clm (causal LM, GPT), mlm (masked LM, RoBERTa), mlm+nsp (BERT's MLM + NSP), rtd (ELECTRA / DeBERTa-v3 RTD)."""
    model_config: str | None = None
    """A HF config.json-style JSON / YAML file (model_type bert, gpt2, llama...) for a new model; inline in a recipe."""
    init_from: str | None = None
    """Continue pretraining this model folder instead (domain-adaptive pretraining)."""
    tokenizer: str | None = None
    """A tokenizer folder or file, or 'char' to build a character vocabulary from the data (default: init_from's)."""
    data: list[str] = field(default_factory=list)
    """Raw text / JSONL files or folders, or one built corpus folder (with index.json)."""
    corpus_dir: str | None = None
    """Where to build the token corpus (default: <output_dir>/corpus; reused when it matches)."""
    doc_split: Literal["blank", "line", "file"] = "blank"
    """Documents in plain text: blank-line-separated blocks, lines, or whole files."""
    text_field: str = "text"
    """The JSONL field holding the text."""
    valid_fraction: float = 0.05
    """Share of the corpus held out for evaluation."""
    block_size: int = 128
    """Tokens per example, special tokens included."""
    mlm_probability: float = 0.15
    """Share of tokens masked (mlm, mlm+nsp)."""
    whole_word_masking: bool = False
    """Mask whole words (WordPiece ## pieces, or MeCab words via the tokenizer's word ids)."""
    static_masking: bool = False
    """The same mask for an example every epoch (BERT) instead of a fresh one (RoBERTa)."""
    short_seq_prob: float = 0.1
    """How often an NSP example gets a shorter random target length (mlm+nsp)."""
    generator_layers: int | None = None
    """rtd: the generator's depth, same width as the discriminator (default: half its layers, as DeBERTa-v3)."""
    rtd_weight: float = 50.0
    """rtd: lambda in loss = generator MLM loss + lambda x discriminator RTD loss (50 in ELECTRA and DeBERTa-v3)."""
    embedding_sharing: Literal["gdes", "es", "none"] = "gdes"
    """rtd: gdes (DeBERTa-v3: discriminator tables = sg(generator's) + a delta), es (ELECTRA: one table), or none."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVE_TASKS:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVE_TASKS)}, got {self.objective!r}")
        if (self.model_config is None) == (self.init_from is None):
            raise ValueError("give exactly one of model_config (a new model) and init_from (continue a checkpoint)")
        if not self.data:
            raise ValueError("no data: give raw text / JSONL files or a built corpus folder")
        if isinstance(self.data, str):
            self.data = [self.data]
        check_int("block_size", self.block_size, low=8)
        check_number("valid_fraction", self.valid_fraction, low=0.0, high=1.0, high_open=True)
        check_number("mlm_probability", self.mlm_probability, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("short_seq_prob", self.short_seq_prob, low=0.0, high=1.0)
        if self.generator_layers is not None:
            check_int("generator_layers", self.generator_layers, low=1)
        check_number("rtd_weight", self.rtd_weight, low=0.0)
        if self.embedding_sharing not in ("gdes", "es", "none"):
            raise ValueError(f"embedding_sharing must be gdes, es or none, got {self.embedding_sharing!r}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (and its dataclass bases' for fields
    it inherits): {field name: one-line help}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = str(following.value.value).strip()
    return docs
