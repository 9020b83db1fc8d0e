"""Pretraining from raw text: causal LM, masked LM, BERT's masked LM + next-sentence prediction, or ELECTRA /
DeBERTa-v3 replaced token detection (:mod:`bunmyaku.training.rtd`).

``run_pretraining`` wires the layers together: a tokenizer (a folder, or ``"char"`` for a character vocabulary
built from the data), a model (a HF ``config.json``-style JSON / YAML file, or ``init_from`` an existing
checkpoint for domain-adaptive pretraining), a token corpus built from the raw files, the objective's examples
and collator, and the Trainer. The output folder is HF layout: ``transformers`` loads the model with
``AutoModelForCausalLM`` / ``AutoModelForMaskedLM`` / ``BertForPreTraining`` (``AutoModel`` for the
discriminator of ``rtd``, whose generator is in ``generator/``) and the tokenizer with ``AutoTokenizer``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunmyaku.data import (
    CausalLMCollator,
    MaskingCollator,
    PackedBlocks,
    SegmentPairs,
    TokenCorpus,
    build_corpus,
    wordpiece_continuation,
)
from bunmyaku.data.corpus import INDEX_NAME, expand_sources
from bunmyaku.hub.files import write_json_atomic
from bunmyaku.training import distributed as dist_utils
from bunmyaku.training.args import OBJECTIVE_TASKS, PretrainArgs, TrainArgs
from bunmyaku.training.objectives import ReplacedTokenDetection
from bunmyaku.training.outputs import OutputDirBusy, exclusive_output_dir
from bunmyaku.training.recipe import build_args, check_keywords, keyword_signature
from bunmyaku.training.rtd import ReplacedTokenDetection as RTDModel
from bunmyaku.training.rtd import export_discriminator
from bunmyaku.training.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the final metrics and the exported model, ready to use."""

    metrics: dict[str, float]
    """The final evaluation (``eval_loss``, ``eval_accuracy``, ...), as ``metrics.json`` records them."""
    model: nn.Module | None
    """The exported model (the best evaluation's or the last weights), loaded from ``output_dir``, in eval mode
    (None on the other processes of a distributed run: rank 0 exports)."""
    tokenizer: Any
    output_dir: Path
    """The HF folder (config, weights, tokenizer) that ``transformers`` loads, with checkpoints and metrics."""


def pretrain(**options: Any) -> PretrainResult:
    """Pretrain a model from raw text: the Python twin of ``bunmyaku pretrain``, with the command's options as
    keyword arguments (``--model-config`` is ``model_config``) and the same defaults (both read them from
    :class:`~bunmyaku.training.args.PretrainArgs` and :class:`~bunmyaku.training.args.TrainArgs`). Paths may
    be ``str`` or ``Path``; ``model_config`` may also be the config dict itself.

    Example::

        result = bunmyaku.pretrain(objective="clm", tokenizer="char", data=["input.txt"], output_dir="runs/char",
                                   model_config={"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4})
        result.metrics["eval_loss"], result.model

    Raises:
        TypeError: an unknown option.
        ValueError, FileNotFoundError: bad options or data (naming the option or file and line).
        OutputDirBusy: another run is writing into ``output_dir``.
        TrainingDiverged: the loss stopped being finite.
    """
    check_keywords("pretrain", options, pretrain.__signature__)  # type: ignore[attr-defined]
    values = {k: _plain(v) for k, v in options.items()}
    pargs, targs = build_args((PretrainArgs, TrainArgs), values)
    metrics = run_pretraining(pargs, targs)
    output_dir = Path(targs.output_dir)
    model = tokenizer = None
    if dist_utils.is_main():
        from bunmyaku.models.auto import from_pretrained
        from bunmyaku.tokenization import Tokenizer

        model = from_pretrained(output_dir, task=OBJECTIVE_TASKS[pargs.objective]).eval()
        tokenizer = Tokenizer.from_pretrained(output_dir)
    return PretrainResult(metrics=metrics, model=model, tokenizer=tokenizer, output_dir=output_dir)


def _plain(value: Any) -> Any:
    """Path objects (alone or in a list) as the strings the options hold."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    return value


def run_pretraining(pargs: PretrainArgs, targs: TrainArgs) -> dict[str, float]:
    """Pretrain as described by ``pargs`` and ``targs``; returns the final evaluation metrics.

    The run holds the output folder's lock from start to end (a second run into the same folder is refused);
    a folder with checkpoints is resumed unless ``targs.resume`` is off.

    Raises:
        ValueError: for inconsistent options (a tokenizer without the special tokens the objective needs, a
            vocabulary larger than the model's, bad corpus files).
        OutputDirBusy: another run is writing into the output folder.
        TrainingDiverged: the loss stopped being finite (nothing from then on is saved).
    """
    output_dir = Path(targs.output_dir)
    with _own_output_dir(output_dir):
        return _pretrain(pargs, targs, output_dir)


@contextlib.contextmanager
def _own_output_dir(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir``'s lock for the run (rank 0 takes it; every process stops if it is busy)."""
    with contextlib.ExitStack() as stack:
        refusal: Exception | None = None
        if dist_utils.is_main():
            try:
                stack.enter_context(exclusive_output_dir(output_dir))
            except (OutputDirBusy, NotADirectoryError) as error:
                refusal = error
        messages = dist_utils.gather_objects(str(refusal) if refusal is not None else None)
        if refusal is not None:
            raise refusal
        if messages[0] is not None:
            raise OutputDirBusy(messages[0])
        yield


def _pretrain(pargs: PretrainArgs, targs: TrainArgs, output_dir: Path) -> dict[str, float]:
    tokenizer = _load_tokenizer(pargs)
    torch.manual_seed(targs.seed)  # a new model's initial weights follow --seed
    model = _load_model(pargs, tokenizer)
    _match_model_inputs(tokenizer, model)
    corpus = _corpus(pargs, tokenizer, output_dir, targs.seed)
    train_data, eval_data, collator = _examples(pargs, tokenizer, corpus, targs.seed)
    if dist_utils.is_main():
        logger.info(
            "Pretraining %s (%s, %s parameters) on %s train / %s valid examples",
            type(model).__name__,
            pargs.objective,
            f"{model.num_parameters():,}",
            f"{len(train_data):,}",
            f"{len(eval_data) if eval_data is not None else 0:,}",
        )
    if pargs.objective == "rtd":  # the wrapper is no HF model: the discriminator and generator are exported below
        objective = ReplacedTokenDetection(pargs.rtd_weight)
        trainer = Trainer(
            model, targs, train_data, eval_data, collator, objective, tokenizer=tokenizer, export_dir=None
        )
    else:
        trainer = Trainer(model, targs, train_data, eval_data, collator, tokenizer=tokenizer)
    metrics = trainer.fit()
    if dist_utils.is_main() and pargs.objective == "rtd":
        _export_rtd(trainer, output_dir, targs.export_dtype)
    if dist_utils.is_main():
        summary = {"step": targs.max_steps, **metrics, "best_step": trainer.best["step"]}
        if trainer.best["step"] is not None:
            summary["best_eval_loss"] = trainer.best["eval_loss"]
        summary["exported"] = "best" if targs.export_best and trainer.best["step"] is not None else "last"
        write_json_atomic(output_dir / "metrics.json", summary, sort_keys=False)
    return metrics


def _match_model_inputs(tokenizer, model: nn.Module) -> None:
    """A model without segment embeddings (RoBERTa's one type, DeBERTa-v3's none) is saved with a tokenizer that
    emits no ``token_type_ids``: a BERT tokenizer's second-segment ids would index past a one-row table when the
    model is fine-tuned on sentence pairs."""
    types = getattr(model.config, "type_vocab_size", None)
    if types is not None and types < 2 and "token_type_ids" in tokenizer.model_input_names:
        tokenizer.model_input_names = [name for name in tokenizer.model_input_names if name != "token_type_ids"]


def _export_rtd(trainer: Trainer, output_dir: Path, dtype: str | None) -> None:
    """The discriminator (merged embeddings) to ``output_dir``, the generator to ``output_dir/generator``, with the
    tokenizer in both; under the plugins' evaluation contexts (EMA's averaged weights), as the Trainer exports."""
    with contextlib.ExitStack() as stack:
        for plugin in trainer.plugins:
            stack.enter_context(plugin.evaluation_context(trainer))
        export_discriminator(trainer.unwrapped_model, output_dir, dtype=dtype)
    for folder in (output_dir, output_dir / "generator"):
        trainer.tokenizer.save_pretrained(folder)


def _load_tokenizer(pargs: PretrainArgs):
    from bunmyaku.tokenization import Tokenizer

    source = pargs.tokenizer or pargs.init_from
    if source is None:
        raise ValueError("no tokenizer: give --tokenizer (a folder, a tokenizer.json, or 'char')")
    if source == "char":
        from bunmyaku.data.corpus import read_documents
        from bunmyaku.tokenization import build_char_tokenizer

        files = [p for p in pargs.data if not (Path(p) / INDEX_NAME).is_file()]
        if not files:
            raise ValueError("tokenizer 'char' needs raw text files in data to collect the characters from")
        texts = (text for path in files for text in read_documents(path, doc_split="file"))
        return build_char_tokenizer(texts, model_max_length=pargs.block_size)
    return Tokenizer.from_pretrained(source)


def read_model_config(path: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A HF ``config.json``-style dict from a JSON or YAML file (or the dict itself, written inline in a recipe)."""
    import json

    import yaml

    from bunmyaku.training.recipe import load_yaml

    if isinstance(path, dict):
        if "model_type" not in path:
            raise ValueError("the inline model config needs a 'model_type' (bert, gpt2, llama, ...)")
        return dict(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"model config {path}: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"model config {path} must be a mapping with a 'model_type' (bert, gpt2, llama, ...)")
    return data


def _load_model(pargs: PretrainArgs, tokenizer):
    from bunmyaku.models.auto import from_pretrained, model_class

    task = OBJECTIVE_TASKS[pargs.objective]
    if pargs.objective == "rtd" and pargs.init_from is not None:
        model = RTDModel.from_pretrained(pargs.init_from, embedding_sharing=pargs.embedding_sharing)
    elif pargs.init_from is not None:
        model = from_pretrained(pargs.init_from, task=task)
    else:
        hf = read_model_config(pargs.model_config)
        hf.setdefault("vocab_size", len(tokenizer))
        for name in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            if token_id is not None and f"{name}_token_id" not in hf:
                hf[f"{name}_token_id"] = token_id
        cls = model_class(hf["model_type"], task)
        config = cls.config_class.from_hf(hf)
        if pargs.objective == "rtd":
            model = RTDModel.from_config(config, pargs.generator_layers, pargs.embedding_sharing)
        else:
            model = cls.from_config(config)
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
    max_len = model.config.max_seq_len
    if pargs.block_size > max_len:
        raise ValueError(f"block_size {pargs.block_size} exceeds the model's max_seq_len {max_len}")
    return model.train()


def _corpus(pargs: PretrainArgs, tokenizer, output_dir: Path, seed: int) -> TokenCorpus:
    if len(pargs.data) == 1 and (Path(pargs.data[0]) / INDEX_NAME).is_file():
        return TokenCorpus(pargs.data[0])
    corpus_dir = Path(pargs.corpus_dir) if pargs.corpus_dir else output_dir / "corpus"
    wanted = {
        "vocab_size": tokenizer.vocab_size,
        "doc_split": pargs.doc_split,
        "word_starts": _needs_word_starts(pargs),
    }
    if dist_utils.is_main() and not _matches(corpus_dir, pargs.data, wanted):
        build_corpus(
            pargs.data,
            tokenizer,
            corpus_dir,
            doc_split=pargs.doc_split,
            text_field=pargs.text_field,
            valid_fraction=pargs.valid_fraction,
            word_starts=wanted["word_starts"],
            seed=seed,
        )
    dist_utils.barrier()
    return TokenCorpus(corpus_dir)


def _needs_word_starts(pargs: PretrainArgs) -> bool:
    """Store word starts for whole-word masking unless the vocabulary marks continuations with ``##``."""
    return pargs.whole_word_masking and pargs.objective != "clm"


def _matches(corpus_dir: Path, data: list[str], wanted: dict[str, Any]) -> bool:
    index_path = corpus_dir / INDEX_NAME
    if not index_path.is_file():
        return False
    index = json.loads(index_path.read_text(encoding="utf-8"))
    sources_match = [Path(s).resolve() for s in index["sources"]] == _resolved_files(data)
    return sources_match and all(index.get(k) == v for k, v in wanted.items())


def _resolved_files(data: list[str]) -> list[Path]:
    return [p.resolve() for p in expand_sources(data)]


def _examples(pargs: PretrainArgs, tokenizer, corpus: TokenCorpus, seed: int):
    train, valid = corpus.split("train"), corpus.split("valid")
    if pargs.objective == "clm":
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise ValueError("causal LM packing needs an EOS (or SEP) token in the tokenizer")
        return (
            PackedBlocks(train, pargs.block_size, eos, random_offset=True, seed=seed),
            PackedBlocks(valid, pargs.block_size, eos) if valid.num_docs else None,
            CausalLMCollator(),
        )
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if tokenizer.mask_token_id is None or cls_id is None or sep_id is None:
        raise ValueError("masked LM needs [MASK], [CLS] / <s> and [SEP] / </s> tokens in the tokenizer")
    vocab = tokenizer.get_vocab()
    continuation = wordpiece_continuation(vocab, len(tokenizer))
    if pargs.whole_word_masking and not corpus.index.get("word_starts") and not continuation.any():
        raise ValueError("whole-word masking: the vocabulary has no ## pieces and the corpus has no word starts")
    collator = MaskingCollator(
        vocab_size=len(tokenizer),
        mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        special_ids=tokenizer.all_special_ids,
        mlm_probability=pargs.mlm_probability,
        whole_word=pargs.whole_word_masking,
        continuation=continuation,
        static=pargs.static_masking,
        seed=seed,
    )
    if pargs.objective in ("mlm", "rtd"):
        size = pargs.block_size - 2
        return (
            PackedBlocks(train, size, sep_id, prefix=[cls_id], suffix=[sep_id], random_offset=True, seed=seed),
            PackedBlocks(valid, size, sep_id, prefix=[cls_id], suffix=[sep_id]) if valid.num_docs else None,
            collator,
        )
    short = pargs.short_seq_prob
    return (
        SegmentPairs(train, pargs.block_size, cls_id, sep_id, short_seq_prob=short, seed=seed),
        SegmentPairs(valid, pargs.block_size, cls_id, sep_id, short_seq_prob=short, seed=seed + 1)
        if valid.num_docs >= 2
        else None,
        collator,
    )


pretrain.__signature__ = keyword_signature((PretrainArgs, TrainArgs), PretrainResult)  # type: ignore[attr-defined]
