"""The memory planner: how many bytes one training step of a model takes per device, before running it.

What the Trainer keeps, read from its code:

- **parameters**: the model's own tensors, float32 (``TrainArgs.precision`` bf16 / fp16 does *not* cast them: the
  Trainer trains fp32 weights under ``torch.autocast``, so there is no separate master copy). Counted exactly from
  the real parameter shapes, on the meta device (no memory, no initialisation); tied tensors once.
- **gradients**: one float32 ``.grad`` per trainable parameter (frozen ones have none). Exact.
- **optimizer**: AdamW's ``exp_avg`` and ``exp_avg_sq`` (float32, like the parameter) plus its ``step`` (a float32
  scalar tensor per parameter, as the fused and foreach kernels keep it), for trainable parameters only. Exact.
- **activations**: what autograd saves for the backward pass, counted op by op from our layers (models/layers.py,
  attention.py, linear.py, the heads, the objectives) plus the largest temporaries of the backward pass (the
  gradient of the logits). An estimate, checked against measurement (tests/training/test_memory.py, bench/).
- **buffers**: the model's buffers; under autocast the low-precision copies of the matmul weights (autocast caches
  them for the forward and the backward keeps them); DDP's gradient buckets (a second copy of the gradients when
  more than one process runs); FSDP's unsharded parameters (the root's, held for the step, and two layers' at a
  time: the one computing and the one prefetched) and one layer's unsharded gradients before the reduce-scatter.
- **total**: the peak, not the sum: activations are freed as the backward pass writes gradients, so the step
  peaks at the start of the backward pass (activations and the logits' gradient; or, once that is freed,
  activations and the head's gradients) or at its end (the gradients, beside the embeddings' and the first layer's
  activations, recomputed under checkpointing): ``parameters + optimizer + buffers + max(those three)``. With
  gradient accumulation (``grad_accum_steps``; ``batch_size`` is then one micro-batch) the Trainer clears the
  gradients only after the optimizer step (``zero_grad(set_to_none=True)``), so every micro-batch after the first
  runs its whole forward and backward beside the gradients of the earlier ones: ``gradients`` joins each of the
  three, and the new gradients of the head and of the token table exist for a moment beside the held ones before
  they are added to them.

What autograd saves depends on the kernels, so the device matters (``device``):

- attention: on CUDA (flash / memory-efficient SDPA) q, k, v, the output and the log-sum-exp (B, H, T); on the CPU,
  SDPA's flash kernel saves the same without attention dropout, but with dropout in training PyTorch runs the math
  path, which saves the (B, H, T, T) probabilities, the dropout mask and the dropped probabilities, and scaled
  copies of q and k;
- dropout masks: bool on CUDA (1 byte), a float tensor of the activation's dtype on the CPU.

Under bf16 / fp16 autocast (CUDA's casting rules): the projections' outputs, attention and the MLP's activations
are 2 bytes; the residual stream, the norms and their inputs stay float32 (the weights are float32, and autocast
runs norms in float32); each projection reading a float32 tensor keeps its own 2-byte cast of it (autocast caches
the casts of weights, not of activations), so q, k and v keep three. This part is read from the code, not measured
(the tests run on the CPU, whose autocast casts differently: attention stays float32 there, so the planner
refuses ``precision`` other than fp32 with ``device="cpu"``).

Layer by layer (N = B * T tokens, C width, F the MLP's width, E the activation's bytes), what stays for backward:
the block's input; each norm's input and statistics (LayerNorm: mean and rstd; our RMSNorm also keeps the
normalised input); each projection's input (the norm's output, the merged heads); the MLP's activation input and
output (GELU, ReLU: 2 x N * F; GPT-2's ``gelu_new``, written out in five ops: 5 x N * F; SwiGLU: 4 x N * F); two
dropout masks. With gradient checkpointing, each layer keeps only its input, and one layer's activations exist
again while its backward runs. Freezing layers (the Freeze plugin) removes their gradients and optimizer state but
few of their activations: the trainable embeddings below still need the gradient to flow through them, so what the
input's gradient reads stays, except what only the weights' gradients read: a frozen linear keeps no input and a
frozen RMSNorm no normalised input (``F.rms_norm`` saves it for the weight's gradient alone).

Sharding (``strategy="fsdp"``) divides parameters, gradients and optimizer state by the number of processes, each
tensor cut along its first dimension into equal, padded chunks, as FSDP2's ``fully_shard`` does (rank 0's, the
largest, is reported); ``cpu_offload`` keeps those three on the host (0 bytes on the device).

QLoRA (``lora_quantize``, with ``lora_r``): the base's linear weights (models/quantize.py) count at their quantized
bytes, exactly as bitsandbytes stores them, and one float copy of the largest (a quantized product dequantizes its
weight first) joins the buffers. Under nf4 a base linear keeps nothing of its input for backward (bitsandbytes saves
the packed weight only), so a projection's input stays only where an adapter reads it; int8 (LLM.int8()) keeps it.

LoRA (``lora_r``): rank-r adapters A (r, in) and B (out, r) on the targeted projections (``transformers``' module
names: BERT's ``query,value``, Llama's ``q_proj,v_proj``, GPT-2's ``c_attn`` by default) are trainable, with a new
classification head (PEFT's ``modules_to_save``; a language model's head stays frozen); every other parameter is
frozen. The counts equal PEFT's on the ``transformers`` model. The activations add each adapter's (N, r) product
A x to the base model's, less what frozen weights spare: every norm's normalised input, and below the first adapter
(the embeddings are frozen, so nothing there needs a gradient) the ids and the first norm's input and statistics;
the first adapters keep their input (the first norm's output) all the same.

Tensor parallelism (``tp``; ``world_size`` counts every process): the Trainer's plan (training/sharding.py) splits
each block's column-parallel projections (q, k, v, the MLP's up and gate) by output and its row-parallel ones
(attention output, MLP down) by input, the row-parallel bias whole, and the vocabulary's rows (token table, LM
head, masked-LM bias; a tied table and head are one parameter, counted once); position tables, norms and task heads
stay whole on every process (:func:`_tp_split_dim_outside_blocks` says so in one place). The logits are gathered
whole on every process. Parameters, gradients and optimizer state are
this process's parts, exact; with ``strategy="fsdp"`` those parts are sharded again over the ``world_size / tp``
data-parallel replicas. Activations: the processes of a tensor-parallel group all run the same batch, each with
1 / tp of the heads and of the MLP's width (q, k, v, attention's outputs, the MLP's activations, the merged heads),
while the residual stream, the norms and the inputs of the column-parallel projections stay whole.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunmyaku.models.quantize import check_scheme, quantized_bytes

MODEL_FAMILIES = ("bert", "roberta", "gpt2", "llama")
TASKS = ("causal-lm", "masked-lm", "sequence-classification", "token-classification")
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("cuda", "cpu")
MLM_PROBABILITY = 0.15  # the masked-LM objective's logits cover the masked positions only

# saved (N, F) tensors of the MLP's activation, per activation function (inputs of the ops autograd keeps)
_ACTIVATION_SAVES = {"gelu": 2, "gelu_pytorch_tanh": 2, "relu": 2, "gelu_new": 5}
_DEFAULT_ACTIVATION_SAVES = 5  # a function written out in several ops (gelu_fast, quick_gelu): the larger count

# LoRA targets: transformers' module name -> ours (several when one of theirs spans several of ours)
_LORA_TARGETS = {
    "query": "attn.q_proj",
    "key": "attn.k_proj",
    "value": "attn.v_proj",
    "q_proj": "attn.q_proj",
    "k_proj": "attn.k_proj",
    "v_proj": "attn.v_proj",
    "o_proj": "attn.out_proj",
    "gate_proj": "mlp.fc_gate",
    "up_proj": "mlp.fc_in",
    "down_proj": "mlp.fc_out",
    "c_attn": "attn.q_proj,attn.k_proj,attn.v_proj",  # GPT-2's fused q, k, v: one adapter, out = 3C
    "c_proj": "attn.out_proj",
}
DEFAULT_LORA_TARGETS = {"bert": "query,value", "roberta": "query,value", "llama": "q_proj,v_proj", "gpt2": "c_attn"}


@dataclass
class MemoryEstimate:
    """Predicted bytes per device for one training step (see the module notes for what each field holds)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    total: int
    batch_size: int
    max_length: int

    def as_dict(self) -> dict[str, int]:
        """The byte counts: parameters, gradients, optimizer, activations, buffers, total."""
        out = asdict(self)
        del out["batch_size"], out["max_length"]
        return out


@dataclass
class _Shapes:
    """The parameters of the model for ``task``, on the meta device: what counting needs, nothing allocated."""

    config: Any
    model: nn.Module
    layer: Any  # the LayerConfig of layer 0 (all layers are alike in the supported families)
    model_type: str
    reads_first: bool


def parse_size(text: str) -> int:
    """``"80GB"``, ``"80GiB"``, ``"512MB"``, ``"1e9"`` -> bytes (GB = 10^9, GiB = 2^30).

    Raises:
        ValueError: text that is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--device-memory {text!r}: expected a positive size such as 80GB, 24GiB or 16000MB")
    unit = (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base**power)


def _read_model_config(model: str | Path) -> dict[str, Any]:
    from bunmyaku.hub import read_config

    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"--model {model}: expected a model folder or its config.json, not a {path.suffix} file")
        return read_config(path.parent) if path.name == "config.json" else _json_file(path)
    if path.is_dir():
        return read_config(path)
    raise FileNotFoundError(f"--model {model}: no such folder or config.json")


def _json_file(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None


def _build_shapes(model: str | Path, task: str, num_labels: int | None) -> _Shapes:
    from bunmyaku.models.auto import model_class

    config_dict = _read_model_config(model)
    if not isinstance(config_dict, dict):
        raise ValueError(f"--model {model}: config.json holds a {type(config_dict).__name__}, not an object")
    model_type = config_dict.get("model_type")
    if model_type not in MODEL_FAMILIES:
        raise ValueError(
            f"--model {model}: model_type {model_type!r}: the planner models {list(MODEL_FAMILIES)} "
            "(what their layers save for backward is counted op by op)"
        )
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: the planner knows {list(TASKS)}")
    cls = model_class(model_type, task)
    overrides = {} if num_labels is None else {"num_labels": num_labels}
    config = cls.configure(config_dict, **overrides)
    with torch.device("meta"):
        meta_model = cls(config)
    return _Shapes(config, meta_model, config.layer_config(0), model_type, getattr(cls, "reads", None) == "first")


# ------------------------------------------------------------------------------------------------ exact counts


def _lora_modules(shapes: _Shapes, targets: str | None) -> list[tuple[str, int, int, int]]:
    """(our module name prefix, in features, out features, our linears it spans) of every adapter, one per targeted
    module per layer (GPT-2's ``c_attn`` spans three: one A, shared, and B in three parts; models/lora.py)."""
    names = [t.strip() for t in (targets or DEFAULT_LORA_TARGETS[shapes.model_type]).split(",") if t.strip()]
    unknown = [n for n in names if n not in _LORA_TARGETS]
    if unknown:
        known = sorted(_LORA_TARGETS)
        raise ValueError(f"--lora-targets {unknown}: not a projection the planner knows; expected some of {known}")
    modules = dict(shapes.model.named_modules())
    adapters = []
    for i in range(shapes.config.num_layers):
        for name in names:
            ours = [f"{_layers_prefix(shapes)}{i}.{part}" for part in _LORA_TARGETS[name].split(",")]
            found = [modules[o] for o in ours if o in modules]
            if not found:
                raise ValueError(f"--lora-targets {name}: {shapes.model_type} has no such projection")
            adapters.append((ours[0], found[0].in_features, sum(m.out_features for m in found), len(found)))
    return adapters


def _layers_prefix(shapes: _Shapes) -> str:
    name = next(n for n, _ in shapes.model.named_parameters() if re.search(r"(?:^|\.)layers\.0\.", n))
    return name[: name.index("layers.0.")] + "layers."


def _quantized_weights(shapes: _Shapes) -> dict[str, int]:
    """The weights QLoRA quantizes (models/quantize.py: the base's linears the checkpoint stores) -> elements."""
    from bunmyaku.models.lora import base_linears

    modules = dict(shapes.model.named_modules())
    return {f"{name}.weight": modules[name].weight.numel() for name in base_linears(shapes.model)}


# the projections of a block by what they read: a group's input is kept for backward by any of its linears
_INPUT_GROUPS = {
    "qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "out": ("attn.out_proj",),
    "mlp_in": ("mlp.fc_in", "mlp.fc_gate"),
    "mlp_out": ("mlp.fc_out",),
}


def _unkept_inputs(shapes: _Shapes, targets: str | None) -> frozenset[str]:
    """Under nf4 QLoRA, the input groups no linear keeps: bitsandbytes' 4-bit product saves only the packed weight
    for the input's gradient, so only a LoRA adapter (its A reads the input) keeps a group's input."""
    names = [t.strip() for t in (targets or DEFAULT_LORA_TARGETS[shapes.model_type]).split(",") if t.strip()]
    adapted = {part for name in names for part in _LORA_TARGETS[name].split(",")}
    return frozenset(group for group, members in _INPUT_GROUPS.items() if not adapted.intersection(members))


def _trainable(shapes: _Shapes, task: str, freeze_layers: int, lora: bool) -> dict[str, bool]:
    """Parameter name -> trainable, as the Freeze plugin decides (by name), or under LoRA: only a new task head
    (PEFT's ``modules_to_save`` for classification; a language model's head stays frozen)."""
    from bunmyaku.training.plugins import Freeze

    freeze = Freeze(False, freeze_layers)
    new_head = task not in ("causal-lm", "masked-lm")
    return {
        name: (new_head and name.startswith("head.")) if lora else not freeze.should_freeze(name)
        for name, _ in shapes.model.named_parameters()
    }


def _tp_split_dim(name: str, shape: torch.Size, vocab_size: int) -> int | None:
    """The dimension ``--tp`` splits parameter ``name`` along (None: whole on every process), by the Trainer's plan
    (training/sharding.py): a block's column-parallel projections by output (weight rows and bias), its row-parallel
    ones by input (weight columns; the bias is added once, after the all-reduce, so it stays whole)."""
    from bunmyaku.training.sharding import TP_PLAN_COLUMN, TP_PLAN_ROW

    match = re.search(r"(?:^|\.)layers\.\d+\.(.+)\.(weight|bias)$", name)
    if match is None:
        return _tp_split_dim_outside_blocks(shape, vocab_size)
    module, kind = match.groups()
    if module in TP_PLAN_COLUMN:
        return 0
    if module in TP_PLAN_ROW and kind == "weight":
        return 1
    return None


def _tp_split_dim_outside_blocks(shape: torch.Size, vocab_size: int) -> int | None:
    """The split of a parameter outside the blocks under ``--tp``: the vocabulary's rows (the token table, an untied
    LM head, BERT's masked-LM bias) are split as the Trainer's ``split_vocabulary`` does; position and segment
    tables, norms and task heads stay whole on every process."""
    return 0 if shape[:1] == (vocab_size,) else None


def _tp_local_shape(name: str, shape: torch.Size, tp: int, vocab_size: int) -> torch.Size:
    """The shape of this process's part of parameter ``name`` under ``--tp`` (DTensor's split, rank 0's: the
    first ``ceil(n / tp)`` rows or columns)."""
    dim = _tp_split_dim(name, shape, vocab_size) if tp > 1 else None
    if dim is None:
        return shape
    return torch.Size([*shape[:dim], math.ceil(shape[dim] / tp), *shape[dim + 1 :]])


def _shard_numel(shape: torch.Size, world_size: int) -> int:
    """Elements on rank 0 when FSDP2 cuts a tensor along dim 0 into ``world_size`` equal padded chunks."""
    if not shape:
        return 1
    rows = math.ceil(shape[0] / world_size)
    return rows * math.prod(shape[1:])


def _layer_numels(shapes: _Shapes, tp: int = 1) -> tuple[int, int]:
    """(elements of one Transformer layer, elements outside the layers: embeddings, final norm, head), this
    process's parts under ``tp``."""
    per_layer: dict[int, int] = {}
    rest = 0
    for name, p in shapes.model.named_parameters():
        numel = math.prod(_tp_local_shape(name, p.shape, tp, shapes.config.vocab_size))
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + numel
        else:
            rest += numel
    return max(per_layer.values()), rest


# ------------------------------------------------------------------------------------------------ activations


def _dims(shapes: _Shapes, batch_size: int, max_length: int, tp: int = 1) -> dict[str, int]:
    """The sizes activations are counted in; under ``tp`` a process holds 1 / tp of the heads and of the
    feed-forward width (the residual stream, the norms and their outputs stay whole)."""
    layer = shapes.layer
    return {
        "B": batch_size,
        "T": max_length,
        "N": batch_size * max_length,
        "C": layer.hidden_size,
        "F": layer.intermediate_size // tp,
        "H": layer.num_heads // tp,
        "K": layer.num_kv_heads // tp,
        "D": layer.head_dim,
        "V": shapes.config.vocab_size,
    }


def _attention_saved(d: dict[str, int], rows: int, E: int, math_path: bool) -> int:
    """What SDPA keeps for ``rows`` queries per sequence (keys and values at every position), in bytes."""
    B, T, H, K, D = d["B"], d["T"], d["H"], d["K"], d["D"]
    if math_path:  # q * scale, (k * scale)^T and v repeated to H heads, probabilities, dropout mask, dropped
        return E * (B * rows * H * D + 2 * B * T * H * D + 3 * B * H * rows * T)
    return E * (B * rows * H * D + 2 * B * T * K * D + B * rows * H * D) + 4 * B * H * rows  # q, k, v, out, lse


STREAM_BYTES = 4  # the residual stream and the norms stay float32 under autocast (fp32 weights, fp32 norms)


def _linear_inputs(elements: int, consumers: int, E: int) -> int:
    """Bytes the projections reading one float32 tensor keep: the tensor itself (shared) in fp32; under autocast,
    each projection's own low-precision cast of it (autocast caches casts of weights, not of activations)."""
    return consumers * E * elements if E != STREAM_BYTES else STREAM_BYTES * elements


def _layer_saved(
    shapes: _Shapes,
    d: dict[str, int],
    E: int,
    device: str,
    rows: int | None = None,
    norm_weights: bool = True,
    input_grad: bool = True,
    unkept: frozenset[str] = frozenset(),
) -> int:
    """Bytes one block keeps for backward; ``rows`` < T: only that many query positions per sequence (BERT's last
    layer when the head reads [CLS] only), keys and values still at every position. ``norm_weights``: the norms'
    weights train (a frozen RMSNorm keeps no normalised input); ``input_grad``: the block's input needs a gradient
    (not so above frozen embeddings under LoRA: the first norm then keeps nothing); ``unkept``: the projection
    input groups (:data:`_INPUT_GROUPS`) that no linear keeps (:func:`_unkept_inputs`).

    ``E`` is the bytes of a projection's output (2 under autocast); norms, their inputs and the residual stream are
    float32 (:data:`STREAM_BYTES`)."""
    layer = shapes.layer
    B, T, C, F, H, D = d["B"], d["T"], d["C"], d["F"], d["H"], d["D"]
    S = STREAM_BYTES
    rows = T if rows is None else rows
    n = B * rows  # positions past attention
    mask_bytes = 1 if device == "cuda" else E
    math_path = device == "cpu" and layer.attention_dropout > 0
    stats = 4 * 2 if layer.norm == "layernorm" else 4  # LayerNorm: mean and rstd; RMSNorm: rstd (float32)
    # RMSNorm keeps the normalised input for its weight's gradient only
    normed = S if layer.norm == "rmsnorm" and norm_weights else 0
    mlp_inputs = 2 if layer.mlp == "swiglu" else 1  # projections reading the MLP's input
    saved = 0
    qkv_in = 0 if "qkv" in unkept else _linear_inputs(B * T * C, 3, E)
    mlp_in = 0 if "mlp_in" in unkept else _linear_inputs(n * C, mlp_inputs, E)
    if layer.pre_norm:  # x -> norm -> q, k, v: the norm's input (the block's), statistics, output
        if input_grad:
            saved += S * B * T * C + B * T * (stats + normed * C)
        saved += qkv_in
    else:  # the block's input (the previous norm's output) -> q, k, v
        saved += qkv_in
    saved += _attention_saved(d, rows, E, math_path)
    if "out" not in unkept:
        saved += E * n * H * D  # the merged heads: the output projection's input
    # each sub-layer's residual sum: pre-LN, the MLP norm's input; post-LN, both norms' inputs
    if layer.pre_norm:
        saved += S * n * C + n * (stats + normed * C) + mlp_in
    else:
        saved += S * n * C + n * stats + mlp_in  # norm1: input; output -> the MLP
        saved += S * n * C + n * stats  # norm2's input (its output is the next block's input)
    last = 1 if "mlp_out" in unkept else 0  # the activation's output is the last projection's input
    if layer.mlp == "swiglu":
        saved += (4 - last) * E * n * F  # gate, act(gate), up, their product
    else:
        saved += (_ACTIVATION_SAVES.get(layer.hidden_act, _DEFAULT_ACTIVATION_SAVES) - last) * E * n * F
        if layer.activation_dropout > 0:
            saved += mask_bytes * n * F
    if layer.dropout > 0:
        saved += 2 * mask_bytes * n * C
    return saved


def _embedding_saved(shapes: _Shapes, d: dict[str, int], E: int, device: str, trainable: bool = True) -> int:
    """Ids the embedding backward reads, the embeddings' norm and dropout (the block input counts in the layer);
    frozen embeddings (LoRA) keep none of those, Llama's rotary tables stay (the attention's backward reads them)."""
    T, N, C, D = d["T"], d["N"], d["C"], d["D"]
    config = shapes.config
    if not trainable:
        return 2 * STREAM_BYTES * T * D if shapes.model_type == "llama" else 0
    mask_bytes = 1 if device == "cuda" else STREAM_BYTES  # the embeddings are float32
    if shapes.model_type in ("bert", "roberta"):  # ids, segment ids, positions; sum -> LayerNorm -> dropout
        positions = N if shapes.model_type == "roberta" else T
        saved = 8 * (2 * N + positions) + STREAM_BYTES * N * C + 4 * 2 * N
        return saved + (mask_bytes * N * C if config.dropout > 0 else 0)
    if shapes.model_type == "gpt2":  # ids, positions; dropout
        return 8 * (N + T) + (mask_bytes * N * C if config.embd_dropout > 0 else 0)
    return 8 * N + 2 * STREAM_BYTES * T * D  # llama: ids; the rotary cos and sin (float32), shared by every layer


def _head_saved(
    shapes: _Shapes,
    task: str,
    d: dict[str, int],
    E: int,
    device: str,
    norm_weights: bool = True,
    head_weights: bool = True,
) -> tuple[int, int]:
    """(bytes the final norm and head keep for backward, the largest temporaries of their backward);
    ``norm_weights``: the final norm's weight trains; ``head_weights``: a language model's head trains (under LoRA
    it stays frozen and keeps no input)."""
    B, N, C, V = d["B"], d["N"], d["C"], d["V"]
    layer = shapes.layer
    labels = getattr(shapes.config, "num_labels", 2)
    S = STREAM_BYTES
    final = 0
    if layer.pre_norm:  # the final norm: its input is the last block's output
        normed = S * N * C if layer.norm == "rmsnorm" and norm_weights else 0
        stats = 4 * N * (2 if layer.norm == "layernorm" else 1)
        final = S * N * C + stats + normed  # input, statistics
        if head_weights or task != "causal-lm":  # output: the head's input (a classifier under LoRA trains)
            final += _linear_inputs(N * C, 1, E)
    mask_bytes = 1 if device == "cuda" else S
    if task == "causal-lm":  # log-softmax over (N, V) in float32 (the objective upcasts), and the targets
        return final + 4 * N * V + 8 * N, 2 * 4 * N * V  # backward: the gradient of the log-probs and of the logits
    if task == "masked-lm":  # dense -> act -> norm -> (M, V) at the masked positions only
        M = max(1, round(MLM_PROBABILITY * N))
        head = E * M * C * 4 + 4 * 2 * M + 4 * M * V + 8 * (N + M)
        return head, 2 * 4 * M * V
    if task == "token-classification":  # dropout -> classifier on every position
        dropout = mask_bytes * N * C if getattr(shapes.config, "dropout", 0) else 0
        return final + dropout + _linear_inputs(N * C, 1, E) + 4 * N * labels + 8 * N, 2 * 4 * N * labels
    # sequence classification: one position per sequence (pooler / last token), then a classifier
    return final + E * B * C * 6 + 4 * B * labels + 8 * B, 2 * 4 * B * labels


def _activations(
    shapes: _Shapes,
    task: str,
    d: dict[str, int],
    E: int,
    device: str,
    checkpointing: bool,
    freeze_layers: int = 0,
    lora: bool = False,
    unkept: frozenset[str] = frozenset(),
) -> tuple[int, int, int]:
    """(bytes held for backward at the end of the forward pass, the backward's extra at its peak, bytes still
    held when the first layer's backward runs: the embeddings' and that layer's, recomputed under checkpointing).

    Frozen layers (``freeze_layers``; every layer under ``lora``) keep what the gradient flowing through them
    needs, less their norms' normalised inputs; under LoRA the embeddings are frozen too."""
    L = shapes.config.num_layers
    layers = [
        _layer_saved(
            shapes,
            d,
            E,
            device,
            rows=1 if shapes.reads_first and i == L - 1 else None,
            norm_weights=not lora and i >= freeze_layers,
            input_grad=not (lora and i == 0),
            unkept=unkept if i >= freeze_layers else frozenset(_INPUT_GROUPS),  # frozen linears keep no input
        )
        for i in range(L)
    ]
    head, head_backward = _head_saved(shapes, task, d, E, device, norm_weights=not lora, head_weights=not lora)
    embed = _embedding_saved(shapes, d, E, device, trainable=not lora)
    full = max(layers)
    if checkpointing:  # each layer keeps its input; one layer's activations come back during its backward
        held = embed + L * STREAM_BYTES * d["N"] * d["C"] + head
        return held, max(head_backward, full - STREAM_BYTES * d["N"] * d["C"]), embed + layers[0]
    return embed + sum(layers) + head, head_backward, embed + layers[0]


# ------------------------------------------------------------------------------------------------ the plan


def plan_memory(
    model: str | Path,
    task: str,
    batch_size: int,
    max_length: int,
    precision: str = "fp32",
    strategy: str = "ddp",
    world_size: int = 1,
    checkpointing: bool = False,
    freeze_layers: int = 0,
    lora_r: int = 0,
    lora_targets: str | None = None,
    cpu_offload: bool = False,
    num_labels: int | None = None,
    device: str = "cuda",
    grad_accum_steps: int = 1,
    tp: int = 1,
    lora_quantize: str | None = None,
) -> MemoryEstimate:
    """Predict the peak memory per device of one training step (see the module notes for each component).

    Args:
        model: a model folder in HF layout, or its ``config.json`` (no weights are read).
        task: causal-lm | masked-lm | sequence-classification | token-classification.
        batch_size: sequences per device per micro-batch.
        max_length: tokens per sequence (the planner assumes full, unpadded sequences: the worst case).
        precision: fp32 | bf16 | fp16 (autocast, as the Trainer runs it).
        strategy: ddp | fsdp.
        world_size: processes (devices) in the run.
        checkpointing: gradient checkpointing of every layer.
        freeze_layers: freeze layers 0 .. K-1 (the Freeze plugin).
        lora_r: LoRA rank (0: no LoRA).
        lora_targets: comma-separated ``transformers`` module names to adapt (default per architecture).
        cpu_offload: FSDP keeps parameters, gradients and optimizer state on the host.
        num_labels: classes of a classification head.
        device: cuda | cpu: which kernels run (what SDPA and dropout save; see the module notes).
        grad_accum_steps: micro-batches of ``batch_size`` per optimizer step (gradient accumulation).
        tp: tensor-parallel processes (``--tp``; ``world_size`` counts every process, a multiple of ``tp``).
        lora_quantize: QLoRA: the base's linear weights in ``nf4`` or ``int8`` (needs ``lora_r``).

    Returns:
        The bytes per device.

    Raises:
        FileNotFoundError: no such model folder or config.json.
        ValueError: an option out of range or a model or task the planner does not model.
    """
    from bunmyaku.training.args import check_int

    check_int("batch_size", batch_size, 1)
    check_int("max_length", max_length, 1)
    check_int("world_size", world_size, 1)
    check_int("freeze_layers", freeze_layers, 0)
    check_int("lora_r", lora_r, 0)
    check_int("grad_accum_steps", grad_accum_steps, 1)
    check_int("tp", tp, 1)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {list(PRECISIONS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: expected one of {list(STRATEGIES)}")
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: expected one of {list(DEVICES)}")
    if device == "cpu" and precision != "fp32":
        raise ValueError(
            f"--precision {precision} with --device cpu: CPU autocast casts other ops than CUDA's (attention stays "
            "float32); the planner models CPU steps in fp32 only"
        )
    if cpu_offload and strategy != "fsdp":
        raise ValueError("--cpu-offload keeps sharded state on the host: it needs --strategy fsdp")
    if lora_r and freeze_layers:
        raise ValueError("--lora-r freezes every base weight already; drop --freeze-layers")
    check_scheme(lora_quantize, lora_r)
    if lora_quantize and (strategy != "ddp" or tp > 1):
        raise ValueError("--lora-quantize: a quantized base is not sharded; QLoRA runs under --strategy ddp, no --tp")
    shapes = _build_shapes(model, task, num_labels)
    limit = getattr(shapes.config, "max_seq_len", None)
    if limit is not None and shapes.model_type in ("bert", "roberta", "gpt2") and max_length > limit:
        raise ValueError(f"--max-length {max_length}: the model has {limit} learned positions")
    if freeze_layers > shapes.config.num_layers:
        raise ValueError(f"--freeze-layers {freeze_layers}: the model has {shapes.config.num_layers} layers")
    E = PRECISIONS[precision]
    lora = _lora_modules(shapes, lora_targets) if lora_r else []
    trainable = _trainable(shapes, task, freeze_layers, bool(lora_r))

    if tp > 1:
        _check_tensor_parallel(shapes, tp, world_size, strategy, lora_r)
    replicas = world_size // tp  # data-parallel: the processes of a tensor-parallel group read the same batches
    shard = replicas if strategy == "fsdp" else 1
    params = grads = states = 0
    quantized = _quantized_weights(shapes) if lora_quantize else {}
    for name, p in shapes.model.named_parameters():
        numel = _shard_numel(_tp_local_shape(name, p.shape, tp, shapes.config.vocab_size), shard)
        params += quantized_bytes(tuple(p.shape), lora_quantize) if name in quantized else 4 * numel
        if trainable[name]:
            grads += 4 * numel
            states += 2 * 4 * numel + 4  # exp_avg, exp_avg_sq, step
    for _, fan_in, fan_out, parts in lora:
        numel = _shard_numel(torch.Size([lora_r, fan_in]), shard) + _shard_numel(torch.Size([fan_out, lora_r]), shard)
        params += 4 * numel
        grads += 4 * numel
        states += 2 * 4 * numel + 4 * (1 + parts)  # exp_avg, exp_avg_sq; a step for A and for each part of B
    buffers = sum(b.numel() * b.element_size() for b in shapes.model.buffers())
    if quantized:  # a quantized product dequantizes its weight first: one float copy exists at a time
        buffers += 4 * max(quantized.values())
    if E != 4:
        buffers += E * _matmul_weight_numel(shapes, task)  # autocast's low-precision weight copies
    if strategy == "ddp" and replicas > 1:
        buffers += grads  # DDP's gradient buckets
    if strategy == "fsdp" and replicas > 1:
        layer_numel, rest_numel = _layer_numels(shapes, tp)
        buffers += E * (rest_numel + 2 * layer_numel) + 4 * layer_numel
    if cpu_offload:
        params = grads = states = 0

    d = _dims(shapes, batch_size, max_length, tp)
    # a frozen base linear keeps no input (int8 QLoRA's product keeps its own): only the adapters' A keep theirs
    unkept = _unkept_inputs(shapes, lora_targets) if lora_r and lora_quantize != "int8" else frozenset()
    held, backward_extra, bottom = _activations(
        shapes, task, d, E, device, checkpointing, freeze_layers, lora=bool(lora_r), unkept=unkept
    )
    held += len(lora) * E * d["N"] * lora_r  # each adapter's A x, the input of B
    activations = held + backward_extra
    head_grads = 0 if cpu_offload else _head_grads(shapes, trainable, shard, tp)
    # the backward's largest temporaries (the logits' gradient) are gone before the head's weight gradient is written;
    # when the first layer's backward runs, nearly every gradient exists beside that layer's activations
    peak = max(activations, held + head_grads, grads + bottom)
    if grad_accum_steps > 1:  # later micro-batches run their whole forward and backward beside the gradients so far
        peak = max(peak, grads + max(activations, held + head_grads, bottom + head_grads))
    total = params + states + buffers + peak
    return MemoryEstimate(params, grads, states, activations, buffers, total, batch_size, max_length)


def _matmul_weight_numel(shapes: _Shapes, task: str) -> int:
    """Elements of the weights that autocast casts: every linear's, and the tied LM head's (the token table)."""
    numel = sum(m.weight.numel() for m in shapes.model.modules() if isinstance(m, nn.Linear))
    output = shapes.model.get_output_embeddings()
    if task in ("causal-lm", "masked-lm") and output is None:  # BERT's MLM decoder multiplies by the table itself
        numel += shapes.config.vocab_size * shapes.config.hidden_size
    return numel


def _head_grads(shapes: _Shapes, trainable: dict[str, bool], shard: int, tp: int) -> int:
    """Gradients written first in the backward pass, while the activations are still held: the head's and, for a
    language model, the (V, C) output embedding (tied or not)."""
    total = 0
    for name, p in shapes.model.named_parameters():
        if trainable[name] and (name.startswith("head.") or p.shape[:1] == (shapes.config.vocab_size,)):
            total += 4 * _shard_numel(_tp_local_shape(name, p.shape, tp, shapes.config.vocab_size), shard)
    return total


def _check_tensor_parallel(shapes: _Shapes, tp: int, world_size: int, strategy: str, lora_r: int) -> None:
    """The Trainer's own refusals of a ``--tp`` run (on the meta model), and LoRA, whose wrapped linears it does
    not split."""
    from bunmyaku.training.sharding import check_tensor_parallel

    if lora_r:
        raise ValueError("--tp splits plain linears only, not LoRA-wrapped ones: drop --lora-r or --tp")
    try:
        check_tensor_parallel(shapes.model, tp, world_size, strategy)
    except ValueError as error:
        raise ValueError(f"--tp {tp} --world-size {world_size}: {error}") from None


def largest_batch(device_memory: int, **settings: Any) -> int | None:
    """The largest batch size whose predicted peak fits ``device_memory`` bytes (None: not even 1).

    ``settings`` are :func:`plan_memory`'s arguments other than ``batch_size``. The prediction grows with the
    batch, so a doubling search then a bisection finds it in O(log B) plans.
    """

    def fits(b: int) -> bool:
        return plan_memory(batch_size=b, **settings).total <= device_memory

    if not fits(1):
        return None
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > 2**24:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
