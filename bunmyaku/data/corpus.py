"""Raw text to a memory-mapped token corpus: the input of every pretraining objective.

A built corpus is a folder::

    index.json          dtype, vocabulary size, special ids, sources, and per split the token / document counts
    train.bin           every training document's token ids, back to back (uint16 or uint32)
    train.docs.npy      (D + 1,) int64 document offsets into train.bin: document d is ids[docs[d]:docs[d + 1]]
    valid.bin, valid.docs.npy   the held-out split, in the same form
    train.words.bin     optional: 1 where a token starts a word (whole-word masking for tokenizers without ``##``)

Documents carry no special tokens; each objective adds its own (EOS between documents when packing for a
causal LM, ``[CLS]`` / ``[SEP]`` for BERT). Reading streams line by line and tokenizing runs in batches
through the Rust tokenizer's parallel ``encode_batch``, so a corpus larger than memory is built and read
without ever being held in RAM. The folder is built under a temporary name and renamed when complete: a
failure (an empty corpus, a non-UTF-8 file, a JSONL line without ``text``) leaves nothing behind. A build
holds ``.<name>.lock`` beside the folder while it runs, so builds of one corpus take turns, and the
temporaries a killed build left (``.<name>.tmp-*``, with no live build holding the lock) are removed by the
next one.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bunmyaku.data.tables import DataError, iter_jsonl, utf8_lines

logger = logging.getLogger(__name__)

DocSplit = Literal["blank", "line", "file"]
INDEX_NAME = "index.json"
_ENCODE_BATCH = 1024  # documents per encode_batch call
_MIN_DOCS_FOR_DOC_SPLIT = 20  # fewer documents than this: hold out the tail of the token stream instead


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------- reading


def read_documents(path: str | os.PathLike, doc_split: DocSplit = "blank", text_field: str = "text") -> Iterator[str]:
    """Stream the documents of a text or JSONL file.

    Args:
        path: a ``.jsonl`` / ``.json`` lines file (one record per line, text in ``text_field``) or plain text.
        doc_split: for plain text: ``"blank"`` a document per blank-line-separated block, ``"line"`` one per
            line, ``"file"`` the whole file is one document (tinyshakespeare, as nanoGPT reads it).
        text_field: the JSONL field holding the text.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: naming the byte offset of non-UTF-8 input, or the line number of a bad JSONL record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    if doc_split not in ("blank", "line", "file"):
        raise ValueError(f"doc_split must be 'blank', 'line' or 'file', got {doc_split!r}")
    if path.suffix in (".jsonl", ".json"):
        yield from _jsonl_documents(path, text_field)
        return
    block: list[str] = []
    for _, line in utf8_lines(path):
        if doc_split == "line":
            if line.strip():
                yield line
        elif doc_split == "blank" and not line.strip():
            if block:
                yield "\n".join(block)
            block = []
        else:
            block.append(line)
    text = "\n".join(block)
    if text.strip():
        yield text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for number, record in iter_jsonl(path):
        if text_field not in record:
            raise DataError(f"{path}:{number}: the record has no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: {text_field!r} must be a string, got {type(text).__name__}")
        if text.strip():
            yield text


# ---------------------------------------------------------------------------------------------- building


@dataclass
class Split:
    """One split of a built corpus: the token ids (memory-mapped) and the document offsets."""

    tokens: np.ndarray  # (N,) uint16 / uint32, memory-mapped
    docs: np.ndarray  # (D + 1,) int64 offsets
    word_starts: np.ndarray | None = None  # (N,) uint8, 1 where a token starts a word

    @property
    def num_docs(self) -> int:
        """Number of documents."""
        return len(self.docs) - 1

    def document(self, index: int) -> np.ndarray:
        """The token ids of document ``index``."""
        return self.tokens[self.docs[index] : self.docs[index + 1]]


class TokenCorpus:
    """A built corpus folder (see the module docstring), opened read-only with memory maps."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a built corpus (no {INDEX_NAME})")
        self.index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size: int = self.index["vocab_size"]

    def split(self, name: str) -> Split:
        """Open split ``name`` (``"train"`` or ``"valid"``)."""
        info = self.index["splits"].get(name)
        if info is None:
            raise KeyError(f"{self.directory} has no split {name!r}; it has {sorted(self.index['splits'])}")
        tokens = _open_tokens(self.directory / f"{name}.bin", self.dtype, info["num_tokens"])
        docs = np.load(self.directory / f"{name}.docs.npy", mmap_mode="r", allow_pickle=False)
        words = None
        if self.index.get("word_starts"):
            words = _open_tokens(self.directory / f"{name}.words.bin", np.dtype(np.uint8), info["num_tokens"])
        return Split(tokens, docs, words)


def _open_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def build_corpus(
    sources: Sequence[str | os.PathLike],
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    doc_split: DocSplit = "blank",
    text_field: str = "text",
    valid_fraction: float = 0.05,
    word_starts: bool = False,
    seed: int = 0,
    progress: bool = True,
    workers: int = 0,
) -> TokenCorpus:
    """Tokenize raw text files into a corpus folder (see the module docstring).

    Args:
        sources: text or JSONL files, or folders (every ``.txt`` / ``.jsonl`` file inside, sorted).
        tokenizer: a :class:`bunmyaku.Tokenizer` (its Rust ``backend`` encodes in parallel).
        output_dir: the corpus folder; replaced atomically when it already exists.
        doc_split: how plain text is cut into documents (see :func:`read_documents`).
        text_field: the JSONL field holding the text.
        valid_fraction: share of tokens held out: whole documents drawn at random when there are at least 20,
            otherwise the tail of the token stream (nanoGPT's split of a single file).
        word_starts: also store which tokens start a word (from the tokenizer's word ids, so MeCab words
            for a Japanese tokenizer), for whole-word masking with tokenizers that do not mark ``##`` pieces.
        seed: the seed of the held-out document draw.
        progress: draw a progress bar.
        workers: processes that tokenize. 0: one per CPU core when the tokenizer splits words in Python
            (MeCab), else 1, since the Rust tokenizer already encodes a batch on every core.

    Returns:
        The opened corpus.

    Raises:
        ValueError: when there is no text, a file is not UTF-8 or a JSONL record lacks its text.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    files = expand_sources(sources)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(output_dir):
        _remove_stale_temporaries(output_dir)
        splits = _build(
            files, tokenizer, output_dir, doc_split, text_field, valid_fraction, word_starts, seed, progress, workers
        )
    logger.info(
        "Built corpus %s: %s train / %s valid tokens (%s)",
        output_dir,
        f"{splits['train']['num_tokens']:,}",
        f"{splits['valid']['num_tokens']:,}",
        token_dtype(tokenizer.vocab_size).name,
    )
    return TokenCorpus(output_dir)


@contextmanager
def _build_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside the corpus folder (released by the OS however the process ends)."""
    fd = os.open(output_dir.parent / f".{output_dir.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one build at a time is the user's affair
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("Waiting for another build of %s to finish", output_dir)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Delete ``.<name>.tmp-*`` folders: under the build lock, none belongs to a live build."""
    for stale in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        logger.warning("Removing %s, left by an interrupted corpus build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _build(
    files: list[Path],
    tokenizer: Any,
    output_dir: Path,
    doc_split: DocSplit,
    text_field: str,
    valid_fraction: float,
    word_starts: bool,
    seed: int,
    progress: bool,
    workers: int,
) -> dict[str, Any]:
    """Tokenize into a temporary folder, then rename it onto ``output_dir``; returns the splits' index entries."""
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        if workers == 0:
            workers = (os.cpu_count() or 1) if _splits_words_in_python(tokenizer) else 1
        docs, total = _tokenize_all(files, tokenizer, tmp, dtype, doc_split, text_field, word_starts, progress, workers)
        if total == 0:
            raise ValueError(f"the corpus is empty: no text in {[str(f) for f in files]}")
        splits = _write_splits(tmp, dtype, docs, total, valid_fraction, word_starts, seed)
        index = {
            "format": 1,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "special_ids": _special_ids(tokenizer),
            "sources": [str(f) for f in files],
            "doc_split": doc_split,
            "word_starts": word_starts,
            "splits": splits,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, allow_nan=False), encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return splits


def expand_sources(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """The files behind ``sources``: files as given, folders as every ``.txt`` / ``.jsonl`` file inside, sorted."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise ValueError(f"corpus folder {path} holds no .txt or .jsonl file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus source {path} does not exist")
    if not files:
        raise ValueError("no corpus files given")
    return files


def _special_ids(tokenizer: Any) -> dict[str, int]:
    names = ("bos", "eos", "sep", "cls", "pad", "mask", "unk")
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in names}
    return {name: int(i) for name, i in ids.items() if i is not None}


def _splits_words_in_python(tokenizer: Any) -> bool:
    """Whether the tokenizer's word splitting (MeCab) runs in Python, under the GIL, so only processes help."""
    return getattr(tokenizer, "init_kwargs", {}).get("word_tokenizer_type") == "mecab"


def _document_batches(files: list[Path], doc_split: DocSplit, text_field: str) -> Iterator[tuple[Path, list[str]]]:
    """Batches of documents, file by file; an empty batch marks the end of a file (for the progress bar)."""
    for path in files:
        batch: list[str] = []
        for text in read_documents(path, doc_split, text_field):
            batch.append(text)
            if len(batch) == _ENCODE_BATCH:
                yield path, batch
                batch = []
        if batch:
            yield path, batch
        yield path, []


def _encode_texts(backend: Any, texts: list[str]) -> list[tuple[list[int], list[int | None]]]:
    return [(e.ids, e.word_ids) for e in backend.encode_batch(texts, add_special_tokens=False)] if texts else []


_WORKER_BACKEND: Any = None


def _start_worker(tokenizer_dir: str) -> None:
    global _WORKER_BACKEND
    from bunmyaku.tokenization import Tokenizer

    _WORKER_BACKEND = Tokenizer.from_pretrained(tokenizer_dir).backend


def _encode_in_worker(item: tuple[Path, list[str]]) -> tuple[Path, list[tuple[list[int], list[int | None]]], bool]:
    path, texts = item
    return path, _encode_texts(_WORKER_BACKEND, texts), not texts


def _encoded_batches(
    files: list[Path], tokenizer: Any, doc_split: DocSplit, text_field: str, workers: int, stack: ExitStack
) -> Iterator[tuple[Path, list[tuple[list[int], list[int | None]]], bool]]:
    """(file, encoded documents, end of file) in corpus order, from this process or a pool of ``workers``."""
    batches = _document_batches(files, doc_split, text_field)
    if workers <= 1:
        return ((path, _encode_texts(tokenizer.backend, texts), not texts) for path, texts in batches)
    tokenizer_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bunmyaku-tokenizer-"))
    tokenizer.save_pretrained(tokenizer_dir)
    pool = stack.enter_context(
        multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(tokenizer_dir,))
    )
    return pool.imap(_encode_in_worker, batches)  # imap keeps the order, so the corpus is the same


def _tokenize_all(
    files: list[Path],
    tokenizer: Any,
    tmp: Path,
    dtype: np.dtype,
    doc_split: DocSplit,
    text_field: str,
    word_starts: bool,
    progress: bool,
    workers: int = 1,
) -> tuple[list[int], int]:
    """Stream every document through the tokenizer into ``tmp/all.bin``; returns the offsets and token count."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    docs = [0]
    total = 0
    size = sum(f.stat().st_size for f in files)
    done_bytes = 0
    columns = (TextColumn("tokenizing"), BarColumn(), TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn())
    with (
        ExitStack() as stack,
        Progress(*columns, disable=not progress) as bar,
        (tmp / "all.bin").open("wb") as out,
        (tmp / "all.words.bin").open("wb") if word_starts else nullcontext() as words_out,
    ):
        task = bar.add_task("tokenizing", total=max(size, 1), tokens=0)
        for path, encoded, end_of_file in _encoded_batches(files, tokenizer, doc_split, text_field, workers, stack):
            for ids, word_ids in encoded:
                if not ids:
                    continue
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                if words_out is not None:
                    words_out.write(_word_start_flags(word_ids).tobytes())
                total += len(ids)
                docs.append(total)
            if end_of_file:
                done_bytes += path.stat().st_size
            bar.update(task, completed=done_bytes, tokens=total)
    return docs, total


def _word_start_flags(word_ids: list[int | None]) -> np.ndarray:
    flags = np.ones(len(word_ids), dtype=np.uint8)
    for i in range(1, len(word_ids)):
        if word_ids[i] is not None and word_ids[i] == word_ids[i - 1]:
            flags[i] = 0
    return flags


def _write_splits(
    tmp: Path, dtype: np.dtype, docs: list[int], total: int, valid_fraction: float, word_starts: bool, seed: int
) -> dict[str, dict[str, int]]:
    """Split ``all.bin`` into ``train`` and ``valid`` files (chunked copies, never the whole corpus in RAM)."""
    offsets = np.asarray(docs, dtype=np.int64)
    spans = np.stack([offsets[:-1], offsets[1:]], axis=1)  # (D, 2) [start, end) per document
    if len(spans) >= _MIN_DOCS_FOR_DOC_SPLIT:
        valid_mask = _draw_valid_docs(spans, valid_fraction, seed)
        parts = {"train": spans[~valid_mask], "valid": spans[valid_mask]}
    else:
        cut = total - int(round(total * valid_fraction))
        parts = {"train": _clip_spans(spans, 0, cut), "valid": _clip_spans(spans, cut, total)}
    all_tokens = np.memmap(tmp / "all.bin", dtype=dtype, mode="r", shape=(total,))
    all_words = np.memmap(tmp / "all.words.bin", dtype=np.uint8, mode="r", shape=(total,)) if word_starts else None
    splits = {}
    for name, part in parts.items():
        lengths = part[:, 1] - part[:, 0]
        _copy_spans(all_tokens, part, tmp / f"{name}.bin")
        if all_words is not None:
            _copy_spans(all_words, part, tmp / f"{name}.words.bin")
        np.save(tmp / f"{name}.docs.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        splits[name] = {"num_tokens": int(lengths.sum()), "num_docs": len(part)}
    del all_tokens, all_words
    (tmp / "all.bin").unlink()
    if word_starts:
        (tmp / "all.words.bin").unlink()
    return splits


def _draw_valid_docs(spans: np.ndarray, valid_fraction: float, seed: int) -> np.ndarray:
    """Random documents, taken in a seeded order until they hold ``valid_fraction`` of the tokens."""
    lengths = spans[:, 1] - spans[:, 0]
    order = np.random.default_rng(seed).permutation(len(spans))
    target = valid_fraction * lengths.sum()
    taken = np.cumsum(lengths[order]) <= target
    if valid_fraction > 0 and not taken.any():
        taken[0] = True
    mask = np.zeros(len(spans), dtype=bool)
    mask[order[taken]] = True
    return mask


def _clip_spans(spans: np.ndarray, lo: int, hi: int) -> np.ndarray:
    clipped = np.clip(spans, lo, hi)
    return clipped[clipped[:, 1] > clipped[:, 0]]


def _copy_spans(source: np.ndarray, spans: np.ndarray, path: Path, chunk: int = 1 << 24) -> None:
    with path.open("wb") as out:
        for start, end in spans:
            for lo in range(int(start), int(end), chunk):
                out.write(np.asarray(source[lo : min(lo + chunk, int(end))]).tobytes())
