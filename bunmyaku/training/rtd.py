"""Replaced token detection (ELECTRA, Clark et al. 2020) with DeBERTa-v3's gradient-disentangled embedding sharing
(He et al. 2021, "DeBERTaV3", section 3).

Notation: B batch, T sequence length, C hidden size, V vocabulary, M masked positions, N real (non-padding) tokens.

    input_ids with 15% of the positions masked (the masked-LM collator's labels mark them)
        -> generator: a small masked LM of the same family            -> logits (M, V) at the masked positions
        -> one token per masked position sampled from softmax(logits)  (temperature 1, no gradient)
    corrupted = the original ids with the masked positions replaced by the samples
        -> discriminator: the full-size encoder (the backbone's base model)
        -> RTD head (dense -> activation -> 1 logit, ELECTRA's)        -> logits (N,) at every real token
    RTD label: 1 where the corrupted token differs from the original; a sample that equals the original is original
    loss = MLM loss (generator) + rtd_weight x binary cross-entropy (discriminator)

Embedding sharing (``embedding_sharing``) between the generator's tables E_G and the discriminator's E_D:

- ``gdes`` (DeBERTa-v3): E_D = sg(E_G) + E_delta, with E_delta initialised to zero. The MLM loss alone trains
  E_G; the RTD loss reaches only E_delta, so the two objectives stop pulling the shared table in opposite
  directions (the "tug-of-war" of plain sharing). Implemented as a ``torch.nn.utils.parametrize`` on the
  discriminator's table: its stored parameter is E_delta, its ``weight`` is computed on every access.
- ``es`` (ELECTRA): one table, trained by both losses.
- ``none``: separate tables.

Every ``nn.Embedding`` in the module that holds the word embeddings (BERT's token, position and segment tables) is
shared the same way; embeddings elsewhere (DeBERTa's relative-position table inside the encoder) are not.

Generator size: same family and width, ``generator_layers`` deep (default: half the discriminator's depth, as
DeBERTa-v3 does). Keeping the width keeps every shared table's shape, so sharing needs no projection.

Export (:func:`export_discriminator`): the discriminator as the backbone's base model in HF layout (``BertModel``,
``RobertaModel``...) with E_D = E_G + E_delta merged into its tables, so ``transformers.AutoModel`` and
``bunmyaku finetune`` load it; the generator goes to ``generator/`` as a masked LM. The RTD head stays out of that
folder (``transformers`` would report its tensors as unused); a BERT discriminator is also written to ``electra/``
as ``transformers``' ``ElectraForPreTraining``, head included, the same encoder under ELECTRA's names.

A backbone plugs in when its ``model_type`` is registered in :data:`bunmyaku.models.auto.MODEL_TYPES` with a
``"base"`` and a ``"masked-lm"`` class, its config has ``num_layers`` (and ``hidden_size``, ``hidden_act``,
``initializer_range``, ``pad_token_id``), its base model implements ``get_input_embeddings()`` and its masked-LM
model names the base model with ``our_base_prefix`` (``"backbone."``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bunmyaku.models.base import PreTrainedModel
from bunmyaku.models.config import ModelConfig
from bunmyaku.models.heads import IGNORE_INDEX
from bunmyaku.models.layers import activation

logger = logging.getLogger(__name__)

EmbeddingSharing = Literal["gdes", "es", "none"]
SHARING_MODES = ("gdes", "es", "none")


@dataclass
class RTDOutput:
    """What :class:`ReplacedTokenDetection` returns.

    ``logits`` (M, V) the generator's at the masked positions (row-major order) and ``mlm_labels`` (M,) the
    original ids there; ``rtd_logits`` (N,) the discriminator's at the real tokens and ``rtd_labels`` (N,) 1 where
    the token was replaced, 0 where it is the original; ``corrupted_ids`` (B, T) the discriminator's input.
    """

    logits: torch.Tensor
    mlm_labels: torch.Tensor
    rtd_logits: torch.Tensor
    rtd_labels: torch.Tensor
    corrupted_ids: torch.Tensor


class DiscriminatorHead(nn.Module):
    """ELECTRA's discriminator head: dense -> activation -> one logit per token, (..., C) -> (...)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(getattr(config, "hidden_act", "gelu"))
        self.out_proj = nn.Linear(config.hidden_size, 1)
        std = getattr(config, "initializer_range", 0.02)
        for linear in (self.dense, self.out_proj):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.act(self.dense(hidden))).squeeze(-1)


class StopGradientSum(nn.Module):
    """GDES's parametrization of a discriminator table: weight = sg(E_G) + E_delta, E_delta the stored parameter."""

    def __init__(self, source: nn.Embedding):
        super().__init__()
        self.source = [source]  # a list: the generator's table is neither a submodule here nor saved twice

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return self.source[0].weight.detach() + delta


def base_model(model: nn.Module) -> nn.Module:
    """The encoder inside a head model (``our_base_prefix``), or the model itself when it is a base model."""
    prefix = getattr(model, "our_base_prefix", "")
    return getattr(model, prefix.rstrip(".")) if prefix else model


def embedding_tables(encoder: nn.Module) -> dict[str, nn.Embedding]:
    """The tables that embed the input: every ``nn.Embedding`` in the module holding ``get_input_embeddings()``,
    by name relative to ``encoder``."""
    word = encoder.get_input_embeddings()
    names = {module: name for name, module in encoder.named_modules()}
    if word not in names:
        raise ValueError(f"{type(encoder).__name__}.get_input_embeddings() is not one of its modules")
    parent_name = names[word].rpartition(".")[0]
    parent = encoder.get_submodule(parent_name) if parent_name else encoder
    prefix = f"{parent_name}." if parent_name else ""
    return {
        prefix + name: module
        for name, module in parent.named_modules()
        if isinstance(module, nn.Embedding) and (module is word or "." not in name)
    }


def share_embeddings(generator: nn.Module, discriminator: nn.Module, mode: EmbeddingSharing) -> list[str]:
    """Make the discriminator's embedding tables share the generator's (see the module docstring); returns the
    shared tables' names. With ``gdes`` the discriminator's tables become E_delta, set to zero.

    Raises:
        ValueError: an unknown mode, or a table whose shape differs between the two models.
    """
    if mode not in SHARING_MODES:
        raise ValueError(f"embedding_sharing must be one of {list(SHARING_MODES)}, got {mode!r}")
    if mode == "none":
        return []
    sources = embedding_tables(base_model(generator))
    targets = embedding_tables(discriminator)
    shared = []
    for name, target in targets.items():
        source = sources.get(name)
        if source is None:
            continue
        if source.weight.shape != target.weight.shape:
            raise ValueError(
                f"embedding {name}: the generator's is {tuple(source.weight.shape)}, the discriminator's "
                f"{tuple(target.weight.shape)}; shared embeddings need the same vocabulary and width"
            )
        if mode == "es":
            target.weight = source.weight
        else:
            with torch.no_grad():
                target.weight.zero_()  # DeBERTa-v3: E_delta starts at zero, so E_D starts as E_G
            parametrize.register_parametrization(target, "weight", StopGradientSum(source))
        shared.append(name)
    return shared


class ReplacedTokenDetection(nn.Module):
    """A generator (masked LM) and a discriminator (base model + RTD head) trained together, ELECTRA-style.

    Args:
        generator: a masked-LM model of the discriminator's family and width.
        discriminator: the base model (the encoder that is exported).
        embedding_sharing: ``gdes``, ``es`` or ``none`` (see the module docstring).
    """

    task = "replaced-token-detection"

    def __init__(self, generator: PreTrainedModel, discriminator: PreTrainedModel, embedding_sharing="gdes"):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.head = DiscriminatorHead(discriminator.config)
        self.embedding_sharing = embedding_sharing
        self.shared = share_embeddings(generator, discriminator, embedding_sharing)
        # heads that read [CLS] (BERT's pooler) get no gradient from RTD: frozen, exported as initialised
        pooler = getattr(discriminator, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.pad_id = discriminator.config.pad_token_id

    @classmethod
    def from_config(
        cls, config: ModelConfig, generator_layers: int | None = None, embedding_sharing: EmbeddingSharing = "gdes"
    ) -> ReplacedTokenDetection:
        """New randomly initialised models: the discriminator from ``config``, the generator with
        ``generator_layers`` layers (default: half of ``config.num_layers``, at least 1)."""
        from bunmyaku.models.auto import model_class

        layers = generator_layers if generator_layers is not None else max(1, config.num_layers // 2)
        if layers < 1:
            raise ValueError(f"generator_layers must be at least 1, got {layers}")
        generator_config = dataclasses.replace(config, num_layers=layers)
        generator = model_class(config.model_type, "masked-lm").from_config(generator_config)
        discriminator = model_class(config.model_type, "base").from_config(config)
        return cls(generator, discriminator, embedding_sharing)

    @classmethod
    def from_pretrained(cls, path: str | Path, embedding_sharing: EmbeddingSharing = "gdes") -> ReplacedTokenDetection:
        """Continue from an exported run: the discriminator from ``path``, the generator from ``path/generator``.
        With ``gdes``, E_delta starts as E_D - E_G, so the discriminator's tables are the exported ones; with ``es``
        the discriminator takes the generator's tables.

        Raises:
            FileNotFoundError: ``path`` has no ``generator`` folder.
        """
        from bunmyaku.models.auto import from_pretrained

        path = Path(path)
        if not (path / "generator" / "config.json").is_file():
            raise FileNotFoundError(
                f"{path / 'generator'} does not exist: continuing replaced-token-detection pretraining needs the "
                "generator that `bunmyaku pretrain --objective rtd` exports there"
            )
        generator = from_pretrained(path / "generator", task="masked-lm")
        discriminator = from_pretrained(path, task="base")
        tables = {n: m.weight.detach().clone() for n, m in embedding_tables(discriminator).items()}
        model = cls(generator, discriminator, embedding_sharing)
        if embedding_sharing == "gdes":
            for name in model.shared:
                target = discriminator.get_submodule(name)
                source = target.parametrizations.weight[0].source[0]
                with torch.no_grad():
                    target.parametrizations.weight.original.copy_(tables[name] - source.weight)
        return model

    @property
    def config(self) -> ModelConfig:
        """The discriminator's config (what is exported)."""
        return self.discriminator.config

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters of the generator, discriminator and head, each shared table counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.generator.gradient_checkpointing_enable(enable)
        self.discriminator.gradient_checkpointing_enable(enable)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> RTDOutput:
        """One generator and one discriminator pass.

        Args:
            input_ids: (B, T) the masked input.
            labels: (B, T) the original ids at the masked positions, -100 elsewhere.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            token_type_ids: (B, T) segment ids.
        """
        inputs = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        masked = labels != IGNORE_INDEX
        logits = self._generator_logits(input_ids, labels, masked, inputs)  # (M, V)
        sampled = self._sample(logits)  # (M,)
        original = torch.where(masked, labels, input_ids)
        corrupted = original.masked_scatter(masked, sampled)  # (B, T)
        hidden = self.discriminator(input_ids=corrupted, **inputs).last_hidden_state  # (B, T, C)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(masked)
        return RTDOutput(
            logits=logits,
            mlm_labels=labels[masked],
            rtd_logits=self.head(hidden[real]),  # (N,)
            rtd_labels=(corrupted != original)[real].to(hidden.dtype),
            corrupted_ids=corrupted,
        )

    def _generator_logits(self, input_ids, labels, masked, inputs) -> torch.Tensor:
        """(M, V): only the masked positions go through the vocabulary projection when the model can do that."""
        if "masked_only" in inspect.signature(self.generator.forward).parameters:
            return self.generator(input_ids=input_ids, labels=labels, masked_only=True, **inputs).logits
        return self.generator(input_ids=input_ids, **inputs).logits[masked]

    @torch.no_grad()
    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """A token per row from softmax(logits) (temperature 1). Never the padding id: RoBERTa counts positions
        over the non-padding ids, so a sampled pad would shift every later position."""
        if not logits.numel():
            return torch.zeros(0, dtype=torch.long, device=logits.device)
        logits = logits.detach().float()
        if self.pad_id is not None:  # out of place: the logits are the MLM loss's too
            logits = logits.index_fill(-1, torch.tensor([self.pad_id], device=logits.device), -torch.inf)
        return torch.multinomial(F.softmax(logits, dim=-1), 1).squeeze(-1)


def merged_discriminator(model: ReplacedTokenDetection) -> PreTrainedModel:
    """A copy of the discriminator whose shared tables are plain ``nn.Embedding`` holding E_D (= E_G + E_delta)."""
    discriminator = copy.deepcopy(model.discriminator)
    for name in model.shared:
        table = discriminator.get_submodule(name)
        # a new module rather than remove_parametrizations: the copy shares its parametrized class with the original
        merged = nn.Embedding(*table.weight.shape, padding_idx=table.padding_idx, _weight=table.weight.detach().clone())
        parent_name, _, child = name.rpartition(".")
        setattr(discriminator.get_submodule(parent_name) if parent_name else discriminator, child, merged)
    return discriminator


def export_discriminator(model: ReplacedTokenDetection, directory: Path, dtype: str | None = None) -> None:
    """Write the discriminator (merged tables) to ``directory`` and the generator to ``directory/generator``,
    both in HF layout; a BERT discriminator also goes to ``directory/electra`` with its RTD head
    (:func:`save_electra`)."""
    directory = Path(directory)
    discriminator = merged_discriminator(model)
    discriminator.save_pretrained(directory, dtype=dtype)
    model.generator.save_pretrained(directory / "generator", dtype=dtype)
    if discriminator.config.model_type == "bert":
        save_electra(discriminator, model.head, directory / "electra", dtype=dtype)
    logger.info("Exported the discriminator to %s and the generator to %s", directory, directory / "generator")


def save_electra(discriminator: PreTrainedModel, head: DiscriminatorHead, directory: Path, dtype=None) -> None:
    """A BERT discriminator and its RTD head as ``transformers``' ``ElectraForPreTraining`` (ELECTRA's encoder is
    BERT's, with the embedding projection absent when ``embedding_size == hidden_size``)."""
    from bunmyaku.hub import save_state_dict
    from bunmyaku.hub.files import write_json_atomic
    from bunmyaku.models.base import _resolve_dtype as resolve_dtype

    state = {f"electra.{k}": v for k, v in discriminator.hf_state_dict().items() if not k.startswith("pooler.")}
    for ours, theirs in (("dense", "dense"), ("out_proj", "dense_prediction")):
        for name in ("weight", "bias"):
            state[f"discriminator_predictions.{theirs}.{name}"] = getattr(getattr(head, ours), name).detach()
    config = discriminator.hf_config()
    config.update(model_type="electra", architectures=["ElectraForPreTraining"], embedding_size=config["hidden_size"])
    if dtype is not None:
        resolved = resolve_dtype(dtype, config)
        state = {k: v.to(resolved) if v.is_floating_point() else v for k, v in state.items()}
        config["dtype"] = str(resolved).replace("torch.", "")
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict({k: v.contiguous() for k, v in state.items()}, directory)
    write_json_atomic(directory / "config.json", config)
