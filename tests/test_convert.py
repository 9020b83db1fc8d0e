"""``bunmyaku convert --from gguf``: a HF folder that transformers loads with the logits and token ids that
transformers' own GGUF loader gives for the same file; a failed conversion leaves no folder behind."""

from __future__ import annotations

import stat

import pytest
import torch
from typer.testing import CliRunner

from bunmyaku.cli import app
from bunmyaku.models.llama import LlamaForCausalLM
from tests.conftest import require_module
from tests.unit.test_llama import tiny, write_gguf

transformers = require_module("transformers")
gguf = require_module("gguf")

runner = CliRunner()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a t", "Ġ c", "Ġc at", "o n", "Ġ s"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["the cat sat on the mat", "  in at, the Cats!", "<|im_start|>user\nhi<|im_end|>", "naïve café 文脈"]


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (Radford et al. 2019, encoder.py), in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, shift = {}, 0
    for b in range(256):
        if b in kept:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + shift)
            shift += 1
    return [spelling[b] for b in range(256)]


def vocabulary() -> list[str]:
    return [*SPECIALS, *gpt2_byte_alphabet(), *(m.replace(" ", "") for m in MERGES)]


def write_gguf_with_tokenizer(path, model: LlamaForCausalLM) -> None:
    """A GGUF file as llama.cpp writes a SmolLM2-like model: tests/unit/test_llama.py's tensors and metadata,
    plus a byte-level BPE tokenizer with special tokens and a chat template."""
    tokens = vocabulary()

    def add_tokenizer(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

    write_gguf(path, model, tokenizer=add_tokenizer)


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tiny_gguf(request, tmp_path):
    torch.manual_seed(0)
    config = tiny(vocab_size=len(vocabulary()), tie_word_embeddings=request.param, pad_token_id=0)
    model = LlamaForCausalLM.from_config(config).eval()
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    write_gguf_with_tokenizer(path, model)
    return path, model


def convert(*args) -> str:
    result = runner.invoke(app, ["convert", "--from", "gguf", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def assert_same_as_transformers_gguf_loader(gguf_file, folder, atol=None, rtol=None):
    """Logits and token ids of ``folder`` loaded by transformers equal those of transformers' GGUF loader."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    converted = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == their_tokenizer(text)["input_ids"], text
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(converted(input_ids=ids).logits, expected, atol=atol, rtol=rtol)
    return converted, tokenizer


def test_convert_tiny_gguf_loads_in_transformers(tiny_gguf, tmp_path):
    path, model = tiny_gguf
    out = tmp_path / "out" / "hf"
    assert "Converted" in convert(path, "--output-dir", out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert [p.name for p in out.parent.iterdir()] == ["hf"]  # no temporary sibling left
    converted, tokenizer = assert_same_as_transformers_gguf_loader(path, out)
    with torch.no_grad():  # and the model that was written into the file, as bunmyaku holds it
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            torch.testing.assert_close(converted(input_ids=ids).logits, model(input_ids=ids).logits)
    assert converted.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (converted.config.bos_token_id, converted.config.eos_token_id) == (1, 2)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    for file in [out, *out.iterdir()]:  # the usual modes, not mkdtemp's / mkstemp's 0700 / 0600
        assert stat.S_IMODE(file.stat().st_mode) & 0o044 == 0o044, file


def test_convert_to_bfloat16(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    convert(path, "--output-dir", tmp_path / "bf16", "--dtype", "bfloat16")
    converted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert converted.model.embed_tokens.weight.dtype == torch.bfloat16


def one_line_error(args, tmp_path) -> str:
    result = runner.invoke(app, ["convert", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: ")
    return result.output


def test_convert_errors_are_one_line_and_leave_no_folder(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF but not really a gguf file")
    out = tmp_path / "runs" / "converted"
    assert "junk.gguf" in one_line_error(["--from", "gguf", junk, "--output-dir", out], tmp_path)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half folder, no temporary sibling
    assert "absent.gguf does not exist" in one_line_error(
        ["--from", "gguf", tmp_path / "absent.gguf", "--output-dir", out], tmp_path
    )
    assert "--from onnx" in one_line_error(["--from", "onnx", path, "--output-dir", out], tmp_path)
    # a folder that holds files is refused before any work, and kept as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in one_line_error(["--from", "gguf", path, "--output-dir", out], tmp_path)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert(path, "--output-dir", out, "--overwrite")
    assert "keep.txt" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_convert_smollm2_gguf(smollm2_gguf, tmp_path):
    """The real SmolLM2-135M (Q4_1): the converted folder matches transformers' GGUF loader."""
    out = tmp_path / "smollm2"
    convert(smollm2_gguf, "--output-dir", out)
    # both dequantize the same Q4_1 blocks; the float32 sums then differ in order only
    _, tokenizer = assert_same_as_transformers_gguf_loader(smollm2_gguf, out, atol=1e-4, rtol=1e-4)
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
