"""What every bunmyaku model shares: its output record, weight init, token embeddings (tied, resized), the token a
decoder's sequence classifier reads, and HF-format load / save.

A model class declares how its tensors are named in a HF checkpoint:

- ``base_key_map``: the base model's tensors, relative to the base (``embeddings.word_embeddings.weight``);
- ``hf_base_prefix``: where a HF head model keeps its base (``bert.``); ``our_base_prefix``: where we do
  (``backbone.`` for a head model, ``""`` for the base model itself);
- ``head_key_map``: the head's tensors, full names on both sides.

Loading follows HF's semantics, with errors instead of silent warnings where weights would be lost:
a base checkpoint loads into a head model (the head is newly initialised and logged), a head checkpoint
loads into the base model or another head (the other head's tensors are ignored and logged), and every
missing, unexpected or mis-shaped tensor of the base is an error that names it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bunmyaku.hub import CheckpointError, KeyMap, load_state_dict, read_config, resolve_model_dir, save_state_dict
from bunmyaku.hub.files import write_json_atomic
from bunmyaku.models.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """What a model's ``forward`` returns; fields follow HF's names and are None when not computed.

    Shapes: ``last_hidden_state`` (B, T, C); ``pooler_output`` (B, C); ``logits`` (B, T, V) for language
    models, (B, num_labels) for sequence heads, (B, T, num_labels) for token heads, (B, num_choices) for
    multiple choice; ``start_logits`` / ``end_logits`` (B, T); ``attentions`` one (B, H, T, S) tensor of
    attention weights per layer (``output_attentions=True``; an encoder-decoder's are ``encoder_attentions``,
    ``decoder_attentions`` and ``cross_attentions``, (B, H, T, S) with S the source length).

    Read it as HF's outputs are read: by attribute (``out.logits``), by key (``out["logits"]``), or by position
    (``out[0]``, ``out[:2]``), where positions count only the fields that hold a value, in field order. The
    order is HF's for every head: the loss first, then the logits, then the hidden states and attentions.
    Iterating yields the names of the fields that hold a value, as iterating a HF output does.
    """

    loss: torch.Tensor | None = None
    mc_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self) -> list[str]:
        """Names of the fields that hold a value."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        """The values of the fields that hold one, in field order."""
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        """(name, value) of the fields that hold a value, in field order."""
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        """The values of the fields that hold one, in field order: ``out[i]`` is ``out.to_tuple()[i]``."""
        return tuple(self.values())


def _resolve_dtype(dtype: str | torch.dtype | None, hf_config: dict[str, Any]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
        return resolved
    return dtype


class PreTrainedModel(nn.Module):
    """Base class: config, init, gradient checkpointing, ``from_pretrained`` and ``save_pretrained``."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    task: ClassVar[str] = "base"
    hf_architecture: ClassVar[str] = ""
    base_key_map: ClassVar[KeyMap] = KeyMap({})
    head_key_map: ClassVar[KeyMap] = KeyMap({})
    hf_base_prefix: ClassVar[str] = ""
    our_base_prefix: ClassVar[str] = "backbone."
    # base sub-modules that a checkpoint may lack (BERT's pooler, absent from BertForMaskedLM checkpoints)
    optional_base_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def __call__(self, *args: Any, output_attentions: bool = False, **kwargs: Any) -> Any:
        """``forward``; with ``output_attentions=True`` (HF's keyword), the attention weights too.

        The weights are one (B, H, T, S) tensor per layer, as HF returns them from its eager attention: for
        that call every attention computes softmax(QK^T / sqrt(D) + mask) explicitly (no fused kernel, no
        unpadding), which is slower and keeps T x S numbers per head and layer. They go to ``attentions``, or
        for an encoder-decoder to ``encoder_attentions``, ``decoder_attentions`` and ``cross_attentions``.
        """
        if not output_attentions:
            return super().__call__(*args, **kwargs)
        from bunmyaku.models.attention import recorded_attention

        with recorded_attention(self) as weights:
            out = super().__call__(*args, **kwargs)
        for field, tensors in weights.items():
            setattr(out, field, tuple(tensors) if tensors else None)  # none: the encoder skipped (encoder_outputs)
        return out

    # ---------------------------------------------------------------------------------- weights

    def get_input_embeddings(self) -> nn.Embedding:
        """The (V, C) token embedding table: a head model's is its base model's."""
        backbone = getattr(self, self.our_base_prefix.rstrip("."), None) if self.our_base_prefix else None
        if isinstance(backbone, PreTrainedModel):
            return backbone.get_input_embeddings()
        raise NotImplementedError(f"{type(self).__name__} does not say where its token embeddings are")

    def get_output_embeddings(self) -> nn.Linear | None:
        """The (V, C) vocabulary projection that ``tie_word_embeddings`` ties to the token table; None without one."""
        return None

    def _ties_word_embeddings(self) -> bool:
        # a config whose model has a vocabulary projection says whether it is tied
        return self.get_output_embeddings() is not None and self.config.tie_word_embeddings

    def tied_weights(self) -> dict[str, str]:
        """Our parameter names that share storage with another one: {tied name: source name}. Not saved.

        By default the vocabulary projection, when the config ties it to the token table.
        """
        if not self._ties_word_embeddings():
            return {}
        names = {id(module): name for name, module in self.named_modules(remove_duplicate=False)}
        output, tokens = self.get_output_embeddings(), self.get_input_embeddings()
        return {f"{names[id(output)]}.weight": f"{names[id(tokens)]}.weight"}

    def init_weights(self) -> None:
        """HF's initialisation: normal(0, initializer_range) for weights, zeros for biases, ones for norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the vocabulary projection share the token table again (after init, load or resize), when tied.

        A tied projection is built on the meta device (``layers.lm_head``): its weight only ever is the table's.
        """
        if self._ties_word_embeddings():
            self.get_output_embeddings().weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Give the vocabulary ``new_num_tokens`` ids, with the semantics of HF's method of the same name.

        The ids kept keep their vectors; added rows of the token table (and of an untied vocabulary projection)
        start at the mean of the old rows (HF samples them around that mean with a covariance of 1e-9 times the
        old rows', which is the mean to float32 precision); a tied projection stays tied; fewer ids drop the
        last rows; ``config.vocab_size`` follows. The modules stay; their weights become new parameters, on the
        same device and dtype: build the optimizer after resizing.

        Args:
            new_num_tokens: the new vocabulary size, e.g. ``len(tokenizer)`` after adding special tokens.

        Returns:
            The token embedding module.

        Raises:
            ValueError: ``new_num_tokens`` < 1.
            NotImplementedError: a model that does not say where its token table is.
        """
        if new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be at least 1, got {new_num_tokens}")
        tokens = self.get_input_embeddings()
        tokens.weight = _resized_rows(tokens.weight, new_num_tokens)
        tokens.num_embeddings = new_num_tokens
        if tokens.padding_idx is not None and tokens.padding_idx >= new_num_tokens:
            tokens.padding_idx = None
        output = self.get_output_embeddings()
        if output is not None and not self._ties_word_embeddings():
            output.weight = _resized_rows(output.weight, new_num_tokens)
            if output.bias is not None:
                output.bias = _resized_rows(output.bias, new_num_tokens)
            output.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return tokens

    def last_token_index(self, input_ids: torch.Tensor | None, batch_size: int, length: int) -> torch.Tensor | int:
        """Per row, the rightmost token that is not ``config.pad_token_id`` (left or right padding alike): where a
        decoder's sequence classifier reads, found as HF's ``*ForSequenceClassification`` find it.

        Without ``pad_token_id``, or from ``inputs_embeds`` (where padding cannot be seen), the last position.

        Args:
            input_ids: (B, T) ids, or None when the model was given embeddings.
            batch_size: B.
            length: T.

        Returns:
            (B,) indices, or -1 (the last position of every row).

        Raises:
            ValueError: a batch of several rows and no ``pad_token_id`` in the config (the attention mask is not
                used: HF does not use it either, and a model must read the same token as HF's).
        """
        pad = self.config.pad_token_id
        if pad is None and batch_size != 1:
            raise ValueError(
                f"a batch of {batch_size} rows needs config.pad_token_id to find each row's last token "
                "(set it to the id the tokenizer pads with, e.g. eos_token_id for GPT-2 and Llama)"
            )
        if pad is None or input_ids is None:
            return -1
        positions = torch.arange(length, device=input_ids.device)
        return (positions * (input_ids != pad)).argmax(-1)  # (B,)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward instead of keeping them: less memory, one more
        forward pass per block."""
        from bunmyaku.models.layers import Block

        self.config.gradient_checkpointing = enable
        for module in self.modules():
            if isinstance(module, Block):
                module.gradient_checkpointing = enable

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (distinct) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------------------ conversion

    @classmethod
    def preprocess_hf(cls, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensor transforms from HF layout before renaming (GPT-2 transposes, for example). Identity here."""
        return hf_state

    @classmethod
    def postprocess_hf(cls, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`preprocess_hf`, applied after renaming when saving."""
        return hf_state

    @classmethod
    def _hf_to_ours(cls, hf_key: str) -> tuple[str, str | None]:
        """Classify a HF tensor name: ("base" | "head" | "other" | "unexpected", our name or None)."""
        base = cls.base_key_map
        rel = None
        if cls.hf_base_prefix and hf_key.startswith(cls.hf_base_prefix):
            rel = hf_key[len(cls.hf_base_prefix) :]
        elif base.knows_hf(hf_key) and not cls.head_key_map.knows_hf(hf_key):
            rel = hf_key  # a bare base-model checkpoint
        if rel is not None:
            if not base.knows_hf(rel):
                return "unexpected", None
            ours = base.to_ours(rel)
            return "base", None if ours is None else cls.our_base_prefix + ours
        if cls.head_key_map.knows_hf(hf_key):
            return "head", cls.head_key_map.to_ours(hf_key)
        return "other", None

    @classmethod
    def _ours_to_hf(cls, our_key: str) -> str:
        if our_key.startswith(cls.our_base_prefix):
            hf = cls.base_key_map.to_hf(our_key[len(cls.our_base_prefix) :])
            # a base model saves bare names, as HF's base models do; a head model nests them under its prefix
            return cls.hf_base_prefix + hf if cls.our_base_prefix else hf
        return cls.head_key_map.to_hf(our_key)

    def _is_head(self, our_key: str) -> bool:
        return not our_key.startswith(self.our_base_prefix)

    def _is_optional_base(self, our_key: str) -> bool:
        rel = our_key[len(self.our_base_prefix) :]
        return (
            not self._is_head(our_key)
            and bool(self.optional_base_modules)
            and rel.startswith(self.optional_base_modules)
        )

    def load_hf_state_dict(
        self,
        hf_state: dict[str, torch.Tensor],
        source: str = "checkpoint",
        ignore_mismatched_sizes: bool = False,
        assign: bool = False,
    ) -> None:
        """Load tensors named as in a HF checkpoint into this model.

        Args:
            hf_state: tensors by HF name.
            source: where they come from, for error messages.
            ignore_mismatched_sizes: re-initialise head tensors whose shape differs (a classifier with a
                different number of labels) instead of failing.
            assign: where dtype, device and layout already fit, the model's tensors become ``hf_state``'s
                instead of copies of them, and ``hf_state`` is emptied as it is taken over, so that what must be
                copied (another dtype, a transposed layout) is released tensor by tensor: for state dicts
                nobody else holds, such as a safetensors file's memory-mapped tensors (about half the peak
                memory of loading).

        Raises:
            CheckpointError: naming every missing, unexpected and mis-shaped tensor.
        """
        given, hf_state = hf_state, self.preprocess_hf(dict(hf_state))
        expected = self.state_dict()
        tied = self.tied_weights()
        ours: dict[str, torch.Tensor] = {}
        unexpected, ignored, mismatched, reinit = [], [], [], []
        misshaped: list[str] = []  # our names of the mismatched tensors: present, so not also reported missing
        head_keys_in_checkpoint = 0
        for hf_key, tensor in hf_state.items():
            kind, our_key = self._hf_to_ours(hf_key)
            if kind == "head":
                head_keys_in_checkpoint += 1
            if kind == "unexpected":
                unexpected.append(hf_key)
            elif kind == "other" or (
                our_key is not None and our_key not in expected and self._is_optional_base(our_key)
            ):
                ignored.append(hf_key)
            elif our_key is None or our_key in tied:
                continue  # dropped on purpose: a buffer, or a copy of a tied weight
            elif our_key not in expected:
                unexpected.append(hf_key)
            elif tuple(tensor.shape) != tuple(expected[our_key].shape):
                detail = f"{hf_key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[our_key].shape)}"
                if ignore_mismatched_sizes and self._is_head(our_key):
                    reinit.append(our_key)
                else:
                    mismatched.append(detail)
                    misshaped.append(our_key)
            else:
                ours[our_key] = tensor
        missing = [k for k in expected if k not in ours and k not in tied and k not in reinit and k not in misshaped]
        # A head missing entirely (a base checkpoint, or another task's head) is newly initialised, as in HF;
        # a head missing only in part means a broken checkpoint.
        new = [k for k in missing if (self._is_head(k) and head_keys_in_checkpoint == 0) or self._is_optional_base(k)]
        missing = [k for k in missing if k not in new]
        problems = []
        if missing:
            problems.append(f"missing tensors (as named in this model): {missing}")
        if unexpected:
            problems.append(f"unexpected tensors: {unexpected}")
        if mismatched:
            problems.append(f"mis-shaped tensors: {mismatched}")
        if problems:
            raise CheckpointError(
                f"{source} does not fit {type(self).__name__} ({self.config.model_type}): " + "; ".join(problems)
            )
        if ignored:
            logger.info("%s: ignored %d tensors this model has no use for: %s", source, len(ignored), ignored)
        if new or reinit:
            logger.warning("%s: newly initialised %s (train this model before using it)", source, sorted(new) + reinit)
        if assign:  # from here on ``ours`` holds the only references: each tensor goes once it is taken over
            given.clear()
            hf_state.clear()
        with torch.no_grad():
            owners = dict(self.named_parameters(remove_duplicate=False))
            owners.update(self.named_buffers(remove_duplicate=False))
            while ours:
                key, tensor = ours.popitem()
                owner = owners[key]
                if assign and (tensor.dtype, tensor.device) == (owner.dtype, owner.device) and tensor.is_contiguous():
                    owner.data = tensor  # a Parameter keeps its identity (ties, optimizers); its storage changes
                else:
                    owner.copy_(tensor)  # converts dtype, device and layout (GPT-2's transposed Conv1D weights)
        self.tie_weights()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's tensors under their HF names, tied copies left out."""
        tied = self.tied_weights()
        out = {}
        for key, tensor in self.state_dict().items():
            if key in tied:
                continue
            try:
                out[self._ours_to_hf(key)] = tensor
            except KeyError as e:
                raise RuntimeError(f"{type(self).__name__}: tensor {key} has no HF name in the key map") from e
        return self.postprocess_hf(out)

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict that HF needs to rebuild this model."""
        config = self.config.to_hf()
        config["architectures"] = [self.hf_architecture]
        config["dtype"] = str(next(self.parameters()).dtype).replace("torch.", "")
        return config

    # ---------------------------------------------------------------------------------- public

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str | None = "5GB",
        dtype: str | torch.dtype | None = None,
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (or shards and an index) that HF loads.

        Args:
            save_directory: the folder, created if needed.
            max_shard_size: bytes, or a string such as ``"200MB"``; None for a single file.
            dtype: store floating-point weights in this dtype (``"float16"`` halves a float32 model's size);
                default: as they are. The model itself is not changed.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        state = self.hf_state_dict()
        config = self.hf_config()
        if dtype is not None:
            dtype = _resolve_dtype(dtype, config)
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            config["dtype"] = str(dtype).replace("torch.", "")
        save_state_dict(state, save_directory, _parse_size(max_shard_size))
        write_json_atomic(save_directory / "config.json", config)
        return save_directory

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """A randomly initialised model."""
        model = cls(config)
        model.init_weights()
        model.gradient_checkpointing_enable(config.gradient_checkpointing)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        ignore_mismatched_sizes: bool = False,
        **config_overrides: Any,
    ) -> PreTrainedModel:
        """Load a HF model folder (or hub repo id) into this class.

        Args:
            path_or_repo_id: local folder in HF layout, or a hub repo id.
            dtype: torch dtype or its name; ``"auto"`` keeps the checkpoint's; default float32.
            device: where to put the model.
            ignore_mismatched_sizes: re-initialise head tensors whose shape differs.
            config_overrides: config fields to change, e.g. ``num_labels=3`` or ``attn_implementation="eager"``.
        """
        model_dir = resolve_model_dir(path_or_repo_id)
        hf_config = read_config(model_dir)
        return cls.from_hf_state_dict(
            cls.configure(hf_config, **config_overrides),
            load_state_dict(model_dir),
            source=str(model_dir),
            dtype=_resolve_dtype(dtype, hf_config),
            device=device,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            assign=True,  # the model takes over the (memory-mapped) tensors: one copy in memory, not two
        )

    @classmethod
    def configure(cls, hf_config: dict[str, Any], **config_overrides: Any) -> ModelConfig:
        """This class's config from a HF ``config.json`` dict, with ``num_labels`` and other fields overridden."""
        config = cls.config_class.from_hf(hf_config)
        num_labels = config_overrides.pop("num_labels", None)
        if num_labels is not None and num_labels != config.num_labels:
            config = config.with_labels(num_labels)
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        return config

    @classmethod
    def from_hf_state_dict(
        cls,
        config: ModelConfig,
        hf_state: dict[str, torch.Tensor],
        source: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        ignore_mismatched_sizes: bool = False,
        assign: bool = False,
    ) -> PreTrainedModel:
        """Build a model from ``config``, load HF-named tensors into it, move it: what every loader shares.

        Args:
            config: the model's config.
            hf_state: tensors by HF name (a checkpoint's, or a GGUF file's renamed).
            source: where they come from, for error messages.
            dtype: the model's dtype; default float32.
            device: where to put the model.
            ignore_mismatched_sizes, assign: as in :meth:`load_hf_state_dict`.

        Returns:
            The model in eval mode.
        """
        model = cls.from_config(config)
        model.load_hf_state_dict(
            hf_state, source=source, ignore_mismatched_sizes=ignore_mismatched_sizes, assign=assign
        )
        model.to(dtype=dtype or torch.float32, device=device)
        return model.eval()


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '200MB' or '5GB'")


def _resized_rows(weight: torch.Tensor, rows: int) -> nn.Parameter:
    """(V, ...) -> (rows, ...): the first min(V, rows) rows kept, added rows set to the mean of the old ones."""
    with torch.no_grad():
        resized = weight.new_empty(rows, *weight.shape[1:])
        kept = min(rows, weight.size(0))
        resized[:kept] = weight[:kept]
        resized[kept:] = weight.float().mean(0)  # in float32, as HF averages, whatever the weights' dtype
    return nn.Parameter(resized, requires_grad=weight.requires_grad)


class GenerationMixin:
    """``model.generate(input_ids, ...)`` with ``transformers``' keyword names and defaults, for language models.

    A decoder-only model (causal LM) returns its prompts followed by the new tokens, (B, T + n); an encoder-decoder
    model overrides :meth:`_generate` and returns the decoder's ids, (B, 1 + n), the start token first. The
    decoding loops are :mod:`bunmyaku.models.generation`'s.
    """

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        *,
        max_length: int | None = None,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float = 1.0,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        num_return_sequences: int = 1,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        bad_token_ids: list[int] | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        **unsupported: Any,
    ) -> torch.Tensor:
        """Greedy search, sampling or beam search, as ``transformers``' ``generate`` with the same keywords.

        Args:
            input_ids: (B, T) prompts, left-padded when their lengths differ (the source, for encoder-decoders).
            attention_mask: (B, T) 1 for real tokens, 0 for padding; default all ones.
            max_new_tokens: the most tokens to generate; default ``max_length`` minus the prompt, or 20 without
                ``max_length`` (within the model's positions), as in ``transformers`` 5.
            max_length: the most tokens in the output (prompt included, or the start token for encoder-decoders);
                used when ``max_new_tokens`` is not given.
            min_new_tokens: the end tokens are forbidden until this many tokens are generated.
            do_sample: sample (temperature, then top-k, then top-p); False is greedy or beam search.
            temperature, top_k, top_p: sampling only; HF's defaults (1.0, 50, 1.0).
            num_beams: > 1 runs beam search.
            repetition_penalty: > 1 makes tokens already in the sequence less likely (CTRL's penalty, as in HF).
            length_penalty: beam search scores a finished beam sum(log p) / length ** length_penalty.
            early_stopping: beam search stops an input once it holds ``num_beams`` finished hypotheses.
            num_return_sequences: R outputs per input, rows ``b * R`` to ``b * R + R - 1``: the R best beams, or R
                samples; greedy search has one.
            eos_token_id: id(s) that end a row; default ``config.eos_token_id``.
            pad_token_id: fills finished rows; default ``config.pad_token_id``, else the end id.
            bad_token_ids: ids never generated (HF's ``bad_words_ids`` of single tokens).
            seed: sampling from a private generator seeded so; default the global random state, as in HF.
            use_cache: accepted for HF compatibility; the KV cache is always used (it does not change the tokens).

        Returns:
            (B * R, T + n) LongTensor: each prompt followed by its n <= ``max_new_tokens`` new tokens
            (encoder-decoders: the start token, then the n new tokens). Finished rows are padded.

        Raises:
            TypeError: a keyword ``transformers`` takes that bunmyaku does not (it is not silently ignored).
            ValueError: an option out of range, or an impossible combination.
        """
        if unsupported:
            raise TypeError(
                f"{type(self).__name__}.generate() does not support {', '.join(sorted(unsupported))}; "
                f"it takes {', '.join(GENERATE_KEYWORDS)}"
            )
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):  # e.g. HF's generation_config
            raise TypeError(
                f"attention_mask must be a (batch, length) tensor, got {type(attention_mask).__name__}; "
                "pass generation settings as keywords"
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got {shape}")
        if max_new_tokens is None:
            max_new_tokens = self._default_new_tokens(input_ids, max_length)
        from bunmyaku.models.generation import check_generation_args

        check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, num_beams)
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        if num_return_sequences > 1 and num_beams == 1 and not do_sample:
            raise ValueError("greedy search returns one sequence per input: num_return_sequences > 1 needs "
                             "do_sample=True or num_beams >= num_return_sequences")  # fmt: skip
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if do_sample and num_return_sequences > 1:  # R samples per input: the inputs repeated, as HF does
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
            num_return_sequences = 1
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        return self._generate(
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=num_return_sequences,
            eos_token_id=eos,
            pad_token_id=pad,
            bad_token_ids=bad_token_ids,
            seed=seed,
        )

    def _default_new_tokens(self, input_ids: torch.Tensor, max_length: int | None) -> int:
        """``max_length`` minus what the output starts with; without it, 20 new tokens within the model's positions
        (``transformers`` 5's rule)."""
        prefix = self._generated_prefix_length(input_ids)
        if max_length is None:
            max_length = min(prefix + 20, getattr(self.config, "max_seq_len", None) or prefix + 20)
        if max_length <= prefix:
            raise ValueError(
                f"max_length ({max_length}) leaves no room after the {prefix} tokens the output starts with; "
                "pass max_new_tokens"
            )
        return max_length - prefix

    def _generated_prefix_length(self, input_ids: torch.Tensor) -> int:
        """How many tokens the output starts with, which ``max_length`` counts: the prompt, for a decoder."""
        return input_ids.size(1)

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **settings: Any) -> torch.Tensor:
        """A decoder's generation: :func:`bunmyaku.models.generation.generate` over this model."""
        from bunmyaku.models.generation import generate

        return generate(self, input_ids, attention_mask, **settings)


GENERATE_KEYWORDS = tuple(
    name for name in inspect.signature(GenerationMixin.generate).parameters if name not in ("self", "unsupported")
)
