"""LoRA adapters (Hu et al. 2021) on bunmyaku's linears, saved and loaded in PEFT's format.

A LoRA layer keeps its pretrained weight W frozen and learns a low-rank update: ``y = W x + (alpha / r) B A x``
with A (r, in) and B (out, r), B starting at zero. The ``peft`` library does the work: it wraps our
:class:`~bunmyaku.models.linear.Linear` like any ``nn.Linear`` (its forward calls ours, so the frozen product keeps
the oneDNN path) and merges, unmerges and initialises as it does for ``transformers``. What this module adds is
the naming: users name targets as ``transformers`` does (``query,value`` for BERT, ``q_proj,v_proj`` for Llama,
``c_attn`` for GPT-2) and the adapter is written under ``transformers``' module names, so that
``peft.PeftModel.from_pretrained(transformers_model, DIR)`` loads it. Each architecture's key map already says which
of our tensors is which of theirs; the adapter's names are read off it, never listed a second time.

One case needs our own code: a projection that ``transformers`` fuses and we split. GPT-2's ``c_attn`` computes
q, k and v in one (C, 3C) product; we keep ``q_proj``, ``k_proj`` and ``v_proj``. PEFT's LoRA on ``c_attn`` has one
A (r, C) and one B (3C, r), and ``B A x`` split in thirds is ``B_q A x``, ``B_k A x``, ``B_v A x``: the same update
as LoRA on each of our three linears with the one A shared (the same module, so one tensor and one gradient) and B
split by rows. That is how a fused target is applied here; the rows of B are split and joined by the
architecture's own ``preprocess_hf`` / ``postprocess_hf``, which split and join the fused bias the same way. One
difference remains in training only: with ``dropout > 0`` each of the three draws its own dropout mask on the
input where PEFT on ``c_attn`` draws one; saved adapters and outputs in eval mode are the same.

The new task head (a classifier, ``score``, ``qa_outputs``) trains in full and is saved as PEFT's
``modules_to_save``. An adapter folder (:func:`save_adapter`) holds ``adapter_config.json`` (with
``base_model_name_or_path``), ``adapter_model.safetensors`` and the fine-tuned model's config (head, label maps) as
``bunmyaku_config.json``: not as ``config.json``, because ``transformers`` takes a folder with a ``config.json`` and
an adapter for a full model with its weights inside, while without one its ``AutoModel*.from_pretrained(DIR)``
loads the base and the adapter as PEFT does. :func:`load_adapter` rebuilds base + adapter from the folder and
:func:`merge_lora` folds the adapters into the weights, leaving a plain model that ``save_pretrained`` writes as an
ordinary HF folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunmyaku.hub.files import atomic_path, write_json_atomic
from bunmyaku.models.base import _resolve_dtype
from bunmyaku.models.quantize import is_quantized, quantization_config, quantize_base, scheme_of

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "bunmyaku_config.json"  # the fine-tuned config.json (see the module notes)
ADAPTER_NAME = "default"  # PEFT's name for the one adapter; it never appears in saved names
_PEFT_PREFIX = "base_model.model."  # where a PeftModel keeps the wrapped model: saved names start with it
_HF_WEIGHT = re.compile(r"^(?P<module>.+)\.weight(?:\[(?P<part>\w+)\])?$")  # "x.c_attn.weight[q]": a fused part

# PEFT's task types by the ending of the transformers class name (None: a plain PeftModel)
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("MTModel", "SEQ_2_SEQ_LM"),
)


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - the extra is part of the test environment
        raise ImportError("LoRA needs the peft package: pip install 'bunmyaku[lora]'") from e
    return peft


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def has_lora(model: nn.Module) -> bool:
    """Whether :func:`add_lora` put LoRA layers on ``model`` (and :func:`merge_lora` has not merged them yet)."""
    return getattr(model, "_lora", None) is not None


# ------------------------------------------------------------------------------------------------
# Names: our linears under transformers' module names


def _hf_module(model: nn.Module, name: str) -> tuple[str, str | None] | None:
    """transformers' module name for our linear ``name`` and, for a part of a module transformers fuses, which part
    (``("transformer.h.0.attn.c_attn", "q")``); None for a linear the checkpoint does not store (tied)."""
    try:
        hf = type(model)._ours_to_hf(f"{name}.weight")
    except KeyError:
        return None
    match = _HF_WEIGHT.match(hf)
    return None if match is None else (match["module"], match["part"])


def base_linears(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    """Our linear modules of the base model that the checkpoint stores -> :func:`_hf_module`."""
    prefix = type(model).our_base_prefix
    found = {name: _hf_module(model, name) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {name: hf for name, hf in found.items() if hf is not None and name.startswith(prefix)}


def _matches(hf_module: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's name, or its ending after a dot."""
    return hf_module == target or hf_module.endswith(f".{target}")


def resolve_targets(model: nn.Module, targets: list[str]) -> dict[str, tuple[str, str | None]]:
    """Our linears that LoRA on ``targets`` (transformers' module names) adapts, with their transformers names.

    Raises:
        ValueError: a target that names no linear of this architecture (the message lists the valid names).
    """
    linears = base_linears(model)
    valid = sorted({hf.rsplit(".", 1)[-1] for hf, _ in linears.values()})
    unknown = [t for t in targets if not any(_matches(hf, t) for hf, _ in linears.values())]
    if not targets or unknown:
        raise ValueError(
            f"lora_targets: {', '.join(unknown) or 'none given'}: not a linear layer of "
            f"{getattr(type(model), 'hf_architecture', type(model).__name__)}; LoRA targets are transformers' "
            f"module names, for this architecture: {', '.join(valid)}"
        )
    return {ours: hf for ours, hf in linears.items() if any(_matches(hf[0], t) for t in targets)}


# heads that come pretrained with the base (a language model's vocabulary projection): they stay frozen
_PRETRAINED_HEADS = (
    "ForCausalLM",
    "LMHeadModel",
    "ForConditionalGeneration",
    "MTModel",
    "ForMaskedLM",
    "ForPreTraining",
)


def _head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The new task head's parameters, trained in full (outside the base model; tied copies left out; none for a
    base model or a language model's pretrained head)."""
    prefix, tied = type(model).our_base_prefix, set(model.tied_weights())
    if not prefix or getattr(type(model), "hf_architecture", "").endswith(_PRETRAINED_HEADS):
        return {}
    return {name: p for name, p in model.named_parameters() if not name.startswith(prefix) and name not in tied}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for this model's head, None where PEFT has none (multiple choice)."""
    name = getattr(type(model), "hf_architecture", "")
    return next((task for ending, task in _TASK_TYPES if name.endswith(ending)), None)


# ------------------------------------------------------------------------------------------------
# Applying, saving, loading, merging


def add_lora(model: nn.Module, r: int, alpha: float, targets: list[str], dropout: float = 0.0) -> nn.Module:
    """Put LoRA layers on the linears named by ``targets`` and freeze everything else but the task head.

    Args:
        model: a bunmyaku model (in place).
        r: the rank of each update.
        alpha: the update is scaled by ``alpha / r``.
        targets: transformers' module names (``["query", "value"]`` for BERT).
        dropout: dropout on a LoRA layer's input (its update only).

    Returns:
        ``model``, with only the adapters and the head's parameters trainable.

    Raises:
        ValueError: a target this architecture lacks, or a model that already has LoRA layers.
    """
    peft = _peft()
    if has_lora(model):
        raise ValueError("this model already has LoRA layers; merge them (merge_lora) before adding new ones")
    chosen = resolve_targets(model, targets)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="^(?:" + "|".join(re.escape(name) for name in chosen) + ")$",  # exactly these, by our names
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)  # freezes all but the adapters
    _share_fused_a(model, chosen)
    for p in _head_parameters(model).values():
        p.requires_grad_(True)
    model._lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "LoRA r=%d alpha=%g on %d linears (%s): %d trainable parameters of %d",
        r,
        alpha,
        len(chosen),
        ",".join(targets),
        trainable,
        sum(p.numel() for p in model.parameters()),
    )
    return model


def _share_fused_a(model: nn.Module, chosen: dict[str, tuple[str, str | None]]) -> None:
    """The parts of one fused transformers module share one A (and its dropout): see the module notes."""
    first: dict[str, nn.Module] = {}
    for ours, (hf, part) in chosen.items():
        if part is None:
            continue
        layer = model.get_submodule(ours)
        if hf not in first:
            first[hf] = layer
        else:
            layer.lora_A[ADAPTER_NAME] = first[hf].lora_A[ADAPTER_NAME]
            layer.lora_dropout[ADAPTER_NAME] = first[hf].lora_dropout[ADAPTER_NAME]


def _lora_layers(model: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters and the head under PEFT's saved names (``base_model.model.<transformers name>.lora_A.weight``)."""
    fused: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for ours, layer in _lora_layers(model).items():
        hf, part = _hf_module(model, ours)
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight  # (r, in), (out, r)
        out[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = a.detach()
        if part is None:
            out[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = b.detach()
        else:  # B's rows fuse as the module's bias does (see the module notes)
            fused.setdefault(hf, {})[f"{hf}.bias[{part}]"] = b.detach()
    for hf, parts in fused.items():
        (joined,) = type(model).postprocess_hf(parts).values()
        out[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = joined
    head = {type(model)._ours_to_hf(name): p.detach() for name, p in _head_parameters(model).items()}
    for hf, tensor in type(model).postprocess_hf(head).items():
        out[_PEFT_PREFIX + hf] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def adapter_config(model: nn.Module, base_model: str) -> dict[str, Any]:
    """``adapter_config.json`` for ``model``'s adapters, written by PEFT's own ``LoraConfig``."""
    peft = _peft()
    settings = model._lora
    # the head's top-level modules (RoBERTa's classifier holds dense and out_proj): PEFT wraps each whole, and adds
    # its task's own (classifier, score) to the list, so a submodule listed as well would be wrapped twice
    head_modules = sorted(
        {key.removeprefix(_PEFT_PREFIX).split(".")[0] for key in _head_keys(adapter_state_dict(model))}
    )
    conv1d = getattr(model.config, "model_type", None) == "gpt2"  # transformers' GPT-2 stores (in, out) Conv1D
    config = peft.LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["targets"],
        modules_to_save=head_modules or None,
        task_type=task_type(model),
        base_model_name_or_path=base_model,
        fan_in_fan_out=conv1d,
    )
    record = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in record.items()}


def _head_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The head's tensors among :func:`adapter_state_dict`'s names: all but the adapters."""
    return [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model: str, dtype: str | torch.dtype | None = None
) -> Path:
    """Write ``model``'s adapters as PEFT does, plus the fine-tuned model's config (:data:`MODEL_CONFIG`).

    Args:
        model: a bunmyaku model with LoRA layers (:func:`add_lora`).
        directory: the folder, created if needed.
        base_model: the base model's folder (made absolute) or hub repo id, for ``base_model_name_or_path``.
        dtype: store the adapter tensors in this dtype (default: as they are).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    local = Path(base_model).expanduser()
    base = str(local.resolve()) if local.exists() else base_model
    state = adapter_state_dict(model)
    config = model.hf_config()
    scheme = is_quantized(model)
    if scheme:  # load_adapter quantizes the base the same way (transformers' record of it)
        config["quantization_config"] = quantization_config(scheme)
    if dtype is not None:
        dtype = _resolve_dtype(dtype, config)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        config["dtype"] = str(dtype).replace("torch.", "")
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    write_json_atomic(directory / MODEL_CONFIG, config)
    write_json_atomic(directory / ADAPTER_CONFIG, adapter_config(model, base))  # last: it marks the folder
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter folder, checked for what :func:`load_adapter` needs."""
    path = Path(directory) / ADAPTER_CONFIG
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {record.get('peft_type')!r}; bunmyaku loads LORA adapters only")
    for name in ("base_model_name_or_path", "r", "lora_alpha", "target_modules"):
        if not record.get(name):
            raise ValueError(f"{path}: no {name!r}; expected an adapter_config.json written by PEFT")
    for name in ("use_dora", "use_rslora"):
        if record.get(name):
            raise ValueError(f"{path}: {name} is set; bunmyaku loads plain LoRA adapters only")
    targets = record["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules is a regular expression; bunmyaku needs a list of module names")
    return record


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy ``adapter_model.safetensors`` into ``model``'s LoRA layers and head (:func:`add_lora` made them).

    Raises:
        ValueError: a tensor of the file that the model has no place for, or an adapter the file lacks.
    """
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    state = load_file(str(path))
    expected = adapter_state_dict(model)
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown or missing:
        raise ValueError(f"{path}: tensors do not match the adapter (unexpected {unknown}, missing {missing})")
    with torch.no_grad():
        for ours, layer in _lora_layers(model).items():
            hf, part = _hf_module(model, ours)
            layer.lora_A[ADAPTER_NAME].weight.copy_(state[f"{_PEFT_PREFIX}{hf}.lora_A.weight"])
            b = state[f"{_PEFT_PREFIX}{hf}.lora_B.weight"]
            if part is not None:  # this part's rows of the fused B
                b = type(model).preprocess_hf({f"{hf}.bias": b})[f"{hf}.bias[{part}]"]
            layer.lora_B[ADAPTER_NAME].weight.copy_(b)
        head = {k.removeprefix(_PEFT_PREFIX): state[k] for k in _head_keys(expected)}
        params = dict(model.named_parameters())
        for hf, tensor in type(model).preprocess_hf(head).items():
            params[type(model)._hf_to_ours(hf)[1]].copy_(tensor)


class _NewHeadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "newly initialised" not in record.getMessage()


@contextlib.contextmanager
def _head_comes_from_adapter() -> Iterator[None]:
    """Without the base loader's warning about a newly initialised head: the adapter's tensors replace it (and
    :func:`load_adapter_weights` refuses an adapter that lacks them)."""
    base_logger, quiet = logging.getLogger("bunmyaku.models.base"), _NewHeadWarning()
    base_logger.addFilter(quiet)
    try:
        yield
    finally:
        base_logger.removeFilter(quiet)


def load_adapter(
    directory: str | os.PathLike,
    task: str | None = None,
    device: str | torch.device | None = None,
    quantize: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Base model + adapter from a PEFT adapter folder, adapters not merged (:func:`merge_lora` merges them).

    The base comes from ``base_model_name_or_path``; the head's size and label maps from the folder's
    :data:`MODEL_CONFIG` (a folder without one, such as PEFT's own, takes the base's). An adapter trained on a
    quantized base (QLoRA, :mod:`bunmyaku.models.quantize`) gets its base quantized the same way unless
    ``quantize`` is False (merging takes the full-precision base).

    Raises:
        FileNotFoundError: the base model is not where the adapter says.
    """
    from bunmyaku.models.auto import from_pretrained, model_class

    directory = Path(directory)
    record = read_adapter_config(directory)
    base = record["base_model_name_or_path"]
    own = (
        json.loads((directory / MODEL_CONFIG).read_text(encoding="utf-8"))
        if (directory / MODEL_CONFIG).is_file()
        else {}
    )
    labels = own.get("id2label")
    if labels:
        kwargs.setdefault("num_labels", len(labels))
        kwargs.setdefault("ignore_mismatched_sizes", True)
    if task is None and own.get("architectures"):  # the fine-tuned head, not the base's
        task = model_class(own["model_type"], None, own["architectures"][0]).task
    try:
        with _head_comes_from_adapter():
            model = from_pretrained(base, task=task, device=device, **kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{directory / ADAPTER_CONFIG}: base_model_name_or_path {base!r} cannot be loaded ({e}); the adapter "
            "needs its base model there (edit the path, or merge it where the base exists: bunmyaku merge-lora)"
        ) from e
    if labels:
        model.config.id2label = {int(k): v for k, v in labels.items()}
        model.config.label2id = dict(own.get("label2id") or {v: int(k) for k, v in labels.items()})
    for name in ("problem_type",):
        if name in own and hasattr(model.config, name):
            setattr(model.config, name, own[name])
    try:
        scheme = scheme_of(own.get("quantization_config"))
    except ValueError as e:
        raise ValueError(f"{directory / MODEL_CONFIG}: {e}") from None
    if scheme and quantize:
        quantize_base(model, scheme)
    add_lora(model, record["r"], record["lora_alpha"], list(record["target_modules"]), record.get("lora_dropout", 0))
    load_adapter_weights(model, directory)
    return model.eval()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + alpha / r B A) and put the plain linears back, in place.

    Returns:
        ``model``, without LoRA layers: ``save_pretrained`` writes it as an ordinary HF folder.

    Raises:
        ValueError: a quantized base (QLoRA): merging there would round the merged weights to 4 or 8 bits.
    """
    if is_quantized(model):
        raise ValueError(
            f"this model's base is quantized ({is_quantized(model)}): merging in place would round the merged "
            "weights; merge its saved adapter folder instead (bunmyaku merge-lora RUN/model), which takes the "
            "full-precision base"
        )
    for name, layer in _lora_layers(model).items():
        layer.merge(adapter_names=[ADAPTER_NAME])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("_lora", None)
    return model


def merge_adapter_dir(
    directory: str | os.PathLike, output_dir: str | os.PathLike, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Base + adapter of ``directory`` merged into one plain HF folder at ``output_dir`` (config.json,
    model.safetensors, and the tokenizer and ``finetune.json`` when the adapter folder has them), written under a
    temporary name and renamed into place once complete.

    Raises:
        FileExistsError: ``output_dir`` holds files and ``overwrite`` is False.
    """
    import shutil

    from bunmyaku.hub.files import atomic_dir
    from bunmyaku.tokenization import Tokenizer

    directory = Path(directory)
    if not is_adapter_dir(directory):
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}: expected a LoRA adapter folder (RUN/model)")
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        model = merge_lora(load_adapter(directory, device="cpu", quantize=False))
        model.save_pretrained(tmp, dtype=dtype)
        if (directory / "tokenizer.json").is_file():
            Tokenizer.from_pretrained(directory).save_pretrained(tmp)
        if (directory / "finetune.json").is_file():  # bunmyaku predict / evaluate read the task settings from it
            shutil.copyfile(directory / "finetune.json", tmp / "finetune.json")
    return Path(output_dir)
