"""Make a BERT or RoBERTa long: the Longformer paper's recipe (Beltagy et al. 2020, §5 "Pretraining and finetuning").

A Longformer is RoBERTa with a different attention, so a trained encoder becomes one by two copies and no training:

- **positions**: the new table holds ``max_length`` positions, filled with the source's learned positions copied
  over and over (position ``p`` of the long model starts as position ``p mod n`` of the source, ``n`` its number of
  positions); the paper found this keeps the attention's learned locality and makes continued pretraining converge
  fast. A source pretrained on inputs shorter than its table (a BERT with 512 positions trained on 128-token
  sequences) has untrained rows past that length: ``trained_length`` copies only its first rows instead, so position
  ``p`` starts as ``p mod trained_length``. Longformer counts positions as RoBERTa does, from ``pad_token_id + 1``,
  so the table has ``max_length + pad_token_id + 1`` rows; the rows up to ``pad_token_id`` (the padding position)
  are the source's first rows. A RoBERTa keeps its offsets (real position ``i`` sits at row ``pad + 1 + i`` in
  both); a BERT's position ``i`` (row ``i``) moves to row ``pad + 1 + i``;
- **global projections**: ``query_global``, ``key_global``, ``value_global`` start as copies of ``query``, ``key``,
  ``value`` (§3.1 keeps two sets of projections; copying makes a global token attend as it did before);
- everything else (token, segment embeddings, blocks, MLM head) is taken as it is.

So, with a window that covers a whole (short) input and no global tokens, the long model computes what the source
did, exactly: the same positions, the same weights, every token seeing every other.

A BERT maps exactly as well: HF's Longformer keeps ``token_type_embeddings`` (``type_vocab_size`` 2 stays 2) and the
pooler, and its MLM head is BERT's (dense, GELU, LayerNorm, tied decoder + bias) when BERT's ``hidden_act`` is the
exact ``"gelu"``; any other activation in the head is refused, because Longformer's head always uses exact GELU.
Two differences remain, both outside real tokens: a BERT counts padding tokens' positions on, a Longformer gives
them the padding position (their outputs are never read, and padding keys are masked either way); and a BERT's
NSP head (``BertForPreTraining``) is dropped. The tokenizer is copied with ``model_max_length`` raised to
``max_length``; a BERT keeps its WordPiece tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from bunmyaku.hub import read_config, resolve_model_dir
from bunmyaku.hub.files import atomic_dir, write_json_atomic
from bunmyaku.models import longformer

logger = logging.getLogger(__name__)

SOURCE_TYPES = ("bert", "roberta")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _source_model(model_dir: Path, config: dict):
    """The source with its MLM head when the checkpoint has trained MLM weights, else its base model."""
    from bunmyaku.models.auto import check_head, model_class

    cls = model_class(config["model_type"], "masked-lm")
    try:
        check_head(model_dir, config, cls, needed_by="longify")
    except ValueError:
        logger.info("%s has no trained masked-LM head: longifying the base model (LongformerModel)", model_dir)
        cls = model_class(config["model_type"], "base")
    return cls.from_pretrained(model_dir)


def long_positions(
    table: torch.Tensor, source_start: int, pad_token_id: int, max_length: int, trained_length: int | None = None
) -> torch.Tensor:
    """The new position table: ``(max_length + pad_token_id + 1, C)``.

    Args:
        table: (P, C) the source's position embeddings.
        source_start: the row of the source's first real position (``pad + 1`` for RoBERTa, 0 for BERT).
        pad_token_id: the long model's padding index; real positions start at row ``pad_token_id + 1``.
        max_length: real positions in the long model.
        trained_length: copy only the source's first ``trained_length`` real positions (default: all of them).
    """
    learned = table[source_start:]  # (n, C): the source's real positions
    if trained_length is not None:
        learned = learned[:trained_length]
    repeats = -(-max_length // learned.size(0))
    head = table[: pad_token_id + 1]  # rows up to the padding position
    return torch.cat([head, learned.repeat(repeats, 1)[:max_length]]).clone()


def longify(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    max_length: int = 4096,
    attention_window: int | list[int] = 512,
    overwrite: bool = False,
    trained_length: int | None = None,
) -> Path:
    """Turn a BERT or RoBERTa folder into a Longformer folder that ``transformers`` and bunmyaku load.

    Args:
        model: a BERT / RoBERTa folder in HF layout (or hub repo id); its MLM head is kept when it has one.
        output_dir: the Longformer folder to write (config.json, model.safetensors, the tokenizer), written under
            a temporary name and renamed into place once complete.
        max_length: tokens the long model takes (at least the source's).
        attention_window: the two-sided window, one for every layer or one per layer (positive, even).
        overwrite: replace a non-empty ``output_dir``.
        trained_length: the input length the source was pretrained at, when shorter than its position table: only
            those positions are copied (the rest of the source's table was never trained). Inputs up to that length
            still get the source's outputs; default: the whole table.

    Returns:
        ``output_dir``.

    Raises:
        ValueError: the source is not a BERT / RoBERTa, ``max_length`` is below the source's, a bad window or
            ``trained_length``, or a BERT MLM head whose activation is not exact GELU.
        FileExistsError: ``output_dir`` holds files and ``overwrite`` is False.
    """
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in SOURCE_TYPES:
        raise ValueError(
            f"{model_dir / 'config.json'}: model_type {model_type!r}; longify takes a BERT or RoBERTa encoder "
            f"({list(SOURCE_TYPES)}): Longformer is RoBERTa's architecture with a windowed attention"
        )
    source = _source_model(model_dir, config)
    src = source.config
    if src.pad_token_id is None:
        raise ValueError(f"{model_dir / 'config.json'}: no pad_token_id; Longformer counts positions from it")
    source_start = src.pad_token_id + 1 if model_type == "roberta" else 0
    source_length = src.max_seq_len - source_start
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < source_length:
        raise ValueError(
            f"max_length {max_length!r}: expected an int of at least the source's {source_length} positions "
            f"({model_dir})"
        )
    if trained_length is not None and (
        isinstance(trained_length, bool)
        or not isinstance(trained_length, int)
        or not 1 <= trained_length <= source_length
    ):
        raise ValueError(
            f"trained_length {trained_length!r}: expected an int from 1 to the source's {source_length} positions "
            f"({model_dir})"
        )
    has_mlm = source.task == "masked-lm"
    if has_mlm and model_type == "bert" and src.hidden_act != "gelu":
        raise ValueError(
            f"{model_dir / 'config.json'}: hidden_act {src.hidden_act!r}; Longformer's MLM head always uses exact "
            "GELU, so this BERT's MLM head cannot be carried over exactly"
        )
    fields = {f.name: getattr(src, f.name) for f in dataclasses.fields(src) if f.init}
    fields["max_seq_len"] = max_length + src.pad_token_id + 1
    fields["attention_window"] = attention_window
    fields["sep_token_id"] = _sep_token_id(model_dir, config, model_type)
    long_config = longformer.LongformerConfig(**fields)
    cls = longformer.LongformerForMaskedLM if has_mlm else longformer.LongformerModel
    with torch.device("meta"):
        target = cls(long_config)
    state = dict(source.state_dict())
    prefix = "backbone." if has_mlm else ""
    positions = f"{prefix}embed.positions.weight"
    state[positions] = long_positions(state[positions], source_start, src.pad_token_id, max_length, trained_length)
    for layer in range(src.num_layers):
        for name in ("q", "k", "v"):
            for part in ("weight", "bias"):
                ours = f"{prefix}layers.{layer}.attn.{name}_proj.{part}"
                state[f"{prefix}layers.{layer}.attn.{name}_global.{part}"] = state[ours].clone()
    if not has_mlm and target.pooler is not None and f"{prefix}pooler.dense.weight" not in state:
        target.pooler = None  # the source saved no pooler: none is invented
    target.load_state_dict(state, strict=True, assign=True)
    target.eval()
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        target.save_pretrained(tmp)
        _copy_tokenizer(model_dir, tmp, max_length)
    copied = f"its first {trained_length}" if trained_length else f"all {source_length}"
    logger.info(
        "longified %s to %s: %d tokens, window %s, %s positions copied",
        model_dir, output_dir, max_length, attention_window, copied,
    )  # fmt: skip
    return Path(output_dir)


def _sep_token_id(model_dir: Path, config: dict, model_type: str) -> int | None:
    """The separator id (question answering's default global tokens): config.json's, else the tokenizer's."""
    if config.get("sep_token_id") is not None:
        return config["sep_token_id"]
    if (model_dir / "tokenizer.json").is_file():
        from bunmyaku.tokenization import Tokenizer

        return Tokenizer.from_pretrained(model_dir).sep_token_id
    return 2 if model_type == "roberta" else None  # RoBERTa's </s>; a BERT's [SEP] differs by vocabulary


def _copy_tokenizer(model_dir: Path, out: Path, max_length: int) -> None:
    """The source's tokenizer files, with ``model_max_length`` raised to the new length."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
        tokenizer_config["model_max_length"] = max_length
        write_json_atomic(config_path, tokenizer_config)
