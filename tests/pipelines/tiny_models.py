"""Random tiny checkpoints saved with ``transformers``, shared by the pipeline and CLI-verb tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.parity.helpers import randomize

MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC"]
MARIAN_TEXT = [
    "the cat sat on the mat",
    "a dog runs in the park",
    "the quick brown fox jumps over the lazy dog",
    "we translate short sentences with a tiny model",
    "hello world, how are you today?",
]


def bert_head_dir(path: Path, minilm_dir: Path, hf_class: str, seed: int = 0, **config_kwargs) -> Path:
    """A random BERT with the head ``hf_class`` (e.g. "BertForTokenClassification") on MiniLM's tokenizer."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    randomize(getattr(transformers, hf_class)(config), seed=seed, scale=0.5).save_pretrained(path)
    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, path / name)
    return path


def marian_dir(path: Path, seed: int = 0) -> Path:
    """A random MarianMT model with a real (tiny) Marian tokenizer folder: source.spm, target.spm, vocab.json.

    The SentencePiece model is trained here on a few sentences; vocab.json numbers its pieces as the
    .spm does (``</s>`` 0, ``<unk>`` 1, then the pieces) and appends ``<pad>``, as Marian conversions do.
    """
    import sentencepiece as spm
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    text = path / "corpus.txt"
    text.write_text("\n".join(MARIAN_TEXT * 4) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(path / "spm"),
        vocab_size=60,
        model_type="unigram",
        eos_id=0,
        unk_id=1,
        bos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    text.unlink()
    shutil.move(path / "spm.model", path / "source.spm")
    (path / "spm.vocab").unlink()
    shutil.copy(path / "source.spm", path / "target.spm")
    processor = spm.SentencePieceProcessor(model_file=str(path / "source.spm"))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    pad = vocab["<pad>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "MarianTokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 512,
        "source_lang": "xx",
        "target_lang": "yy",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    config = transformers.MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=None,
        bad_words_ids=[[pad]],
        share_encoder_decoder_embeddings=False,
        tie_word_embeddings=False,  # tied random weights make the model repeat its last token forever
    )
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(config)
    with torch.no_grad():  # perturb the learned weights, keep the fixed sinusoidal positions
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
        model.final_logits_bias.normal_(generator=torch.Generator().manual_seed(seed))[0, 0] = -6.0  # a late end
    model.eval().save_pretrained(path)
    return path
