"""The benchmark scenarios. Each builds, for one implementation, a step to time and the tokens it processes.

Both implementations get the same weights (one checkpoint folder) and the same seeded inputs.
``transformers`` runs with its default attention (SDPA) and cache; bunmyaku runs through its public API,
with its defaults (unpadded encoders) and, for generation, ``cache="static"`` (CPU) or ``cache="graph"`` (CUDA).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Config:
    """One row of the results table."""

    scenario: str  # encoder-infer | encoder-train | generate | similarity
    model: str  # bert-base | deberta-v3-base | minilm | gpt2-small | smollm2
    variant: str = ""  # fixed | variable (encoders); b1 | b8 (generation)
    batch: int = 32
    compile: str = ""  # a torch.compile mode ("default", "reduce-overhead", ...) for both models; "": eager

    @property
    def name(self) -> str:
        name = "/".join(p for p in (self.scenario, self.model, self.variant) if p)
        if self.compile:
            name += "+compile" if self.compile == "default" else f"+compile:{self.compile}"
        return name


CONFIGS = [
    *(
        Config(s, m, v)
        for s in ("encoder-infer", "encoder-train")
        for m in ("bert-base", "deberta-v3-base", "minilm")
        for v in ("fixed", "variable")
    ),
    *(Config("generate", m, f"b{b}", b) for m in ("gpt2-small", "smollm2") for b in (1, 8)),
    Config("similarity", "minilm", "10k", 64),
]


# ------------------------------------------------------------------------------------------------
# Checkpoints shared by both implementations


def model_dir(name: str) -> Path:
    """A HF folder for a benchmark model, created once (random weights for the *-shape models)."""
    from bunmyaku.hub.packaged import packaged_model

    path = CACHE / name
    if (path / "config.json").is_file():  # built earlier, or placed there (a GPU machine without the packages)
        return path
    if name == "minilm":
        return packaged_model("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    if name == "bert-base":
        from bunmyaku.models.bert import BertConfig, BertModel

        BertModel.from_config(BertConfig()).save_pretrained(path)
    elif name == "deberta-v3-base":  # microsoft/deberta-v3-base's shape, random weights
        from bunmyaku.models.deberta import DebertaV2Config, DebertaV2Model

        config = DebertaV2Config(**DEBERTA_V3_BASE)
        DebertaV2Model.from_config(config).save_pretrained(path)
    elif name == "gpt2-small":
        from bunmyaku.models.gpt2 import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel.from_config(GPT2Config()).save_pretrained(path)
    elif name == "smollm2":
        import bunmyaku

        bunmyaku.from_pretrained(packaged_model("SmolLM2-135M-Instruct")).save_pretrained(path)
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    return path


# microsoft/deberta-v3-base's config.json (the fields that differ from DebertaV2Config's defaults)
DEBERTA_V3_BASE = dict(
    vocab_size=128100,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    norm_eps=1e-7,
    relative_attention=True,
    max_relative_positions=-1,
    position_buckets=256,
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    pos_att_type="p2c|c2p",
    position_biased_input=False,
    type_vocab_size=0,
    pooler_dropout=0.0,
    pooler_hidden_act="gelu",
)

# rows compared across models, bunmyaku against bunmyaku: (model, baseline of the same shape)
SAME_SHAPE = {"deberta-v3-base": "bert-base"}


# ------------------------------------------------------------------------------------------------
# Inputs


def encoder_batch(config: Config, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask: every row 128 tokens ("fixed"), or seeded lengths, mean ~64, max 256 ("variable")."""
    rng = np.random.default_rng(seed)
    if config.variant == "fixed":
        lengths = np.full(config.batch, 128)
    else:
        lengths = np.clip(rng.gamma(2.0, 32.0, size=config.batch), 8, 256).astype(int)
        lengths[0] = 256  # one long text in the batch, as real data has: everything pads to it
    T = int(lengths.max())
    ids = torch.from_numpy(rng.integers(1000, vocab, size=(config.batch, T)))
    mask = (torch.arange(T)[None] < torch.from_numpy(lengths)[:, None]).long()
    return ids * mask, mask


def similarity_sentences(n: int = 10_000) -> list[str]:
    """Real sentences: AG News test texts (repeated if needed)."""
    import os

    root = Path(os.environ.get("BUNMYAKU_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    lines = (root / "agnews" / "test.tsv").read_text(encoding="utf-8").splitlines()
    texts = [line.split("\t")[0] for line in lines if line]
    return (texts * (n // len(texts) + 1))[:n]


# ------------------------------------------------------------------------------------------------
# Steps: each returns (step function, tokens per step); a step returns optional timings of its own


Step = Callable[[], dict | None]


# DeBERTa attention kernels from PyPI, each a peer: transformers' DeBERTa-v2 with its attention replaced (the
# implementation name is the package's). ``python -m bench --peers`` times the deberta rows with those that import.
PEERS = {"disentangled-flash": "disentangled_flash", "flashdeberta": "flashdeberta"}


def _load_peer(impl: str, path: Path, task: str, device: str, dtype: torch.dtype, **kw):
    """transformers' DebertaV2 with ``impl``'s kernels: disentangled-flash patches the loaded model (Triton on CUDA,
    its own PyTorch backend elsewhere), flashdeberta has its own classes (Triton, CUDA only). Fails loudly when the
    package would silently keep transformers' attention."""
    import transformers

    if impl == "flashdeberta":
        import flashdeberta

        cls = {"base": flashdeberta.FlashDebertaV2Model,
               "sequence-classification": flashdeberta.FlashDebertaV2ForSequenceClassification}[task]  # fmt: skip
        return cls.from_pretrained(path, dtype=dtype, **kw).to(device)
    import disentangled_flash

    auto = {"base": transformers.AutoModel, "sequence-classification": transformers.AutoModelForSequenceClassification}
    model = auto[task].from_pretrained(path, dtype=dtype, **kw).to(device)
    backbone = model if task == "base" else model.deberta
    backend = "triton" if torch.device(device).type == "cuda" else "torch"
    if task == "base":  # the lengths to serve are prepared by the caller (``encoder.prepare_for_inference``)
        disentangled_flash.optimize_deberta(backbone.eval(), backend=backend, inference=True)
    else:  # before the optimizer is built: the parameters stay the model's own
        disentangled_flash.optimize_deberta_training(backbone, backend=backend)
    attention = type(backbone.encoder.layer[0].attention.self)
    if attention.__module__.startswith("transformers."):
        raise RuntimeError(f"disentangled-flash kept transformers' {attention.__name__} ({backend} backend, {device})")
    return model


def _load(impl: str, path: Path, task: str, device: str, dtype: torch.dtype = torch.float32, compile: str = "", **kw):
    """The model of one implementation; with ``compile``, compiled in place (``nn.Module.compile``) in that mode."""
    if impl == "bunmyaku":
        import bunmyaku

        model = bunmyaku.from_pretrained(path, task=task, device=device, dtype=dtype, **kw)
    elif impl in PEERS:
        model = _load_peer(impl, path, task, device, dtype, **kw)
    else:
        import transformers

        auto = {
            "base": transformers.AutoModel,
            "sequence-classification": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM,
        }[task]
        model = auto.from_pretrained(path, dtype=dtype, **kw).to(device)
    if compile:
        model.compile(mode=compile)
    return model


def encoder_infer(impl: str, config: Config, device: str, dtype: torch.dtype) -> tuple[Step, int]:
    model = _load(impl, model_dir(config.model), "base", device, dtype, config.compile).eval()
    ids, mask = encoder_batch(config, model.config.vocab_size)
    ids, mask = ids.to(device), mask.to(device)
    if impl == "disentangled-flash":  # its inference encoder projects the position tables per prepared length once
        model.encoder.prepare_for_inference(ids.shape[1])

    def step():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    return step, int(mask.sum())


def encoder_train(impl: str, config: Config, device: str, dtype: torch.dtype) -> tuple[Step, int]:
    """Float32 weights and optimizer; with a 16-bit ``dtype``, forward and backward under autocast (mixed precision).

    The optimizer is PyTorch's fused AdamW for both: what both libraries' trainers use by default (transformers'
    ``adamw_torch_fused`` since torch 2.8, bunmyaku's ``build_optimizer``).
    """
    path = model_dir(config.model)
    model = _load(impl, path, "sequence-classification", device, compile=config.compile, num_labels=4).train()
    ids, mask = encoder_batch(config, model.config.vocab_size)
    ids, mask = ids.to(device), mask.to(device)
    labels = torch.arange(config.batch, device=device) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    mixed = dtype != torch.float32

    def step():
        if config.compile:
            torch.compiler.cudagraph_mark_step_begin()  # "reduce-overhead" graphs: the last step's outputs are dead
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=mixed):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, int(mask.sum())


PROMPT, NEW = 128, 128


def generate(impl: str, config: Config, device: str, dtype: torch.dtype) -> tuple[Step, int]:
    model = _load(impl, model_dir(config.model), "causal-lm", device, dtype).eval()
    cache = "graph" if device.startswith("cuda") else "static"  # CUDA: decode steps replayed as a CUDA graph
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (config.batch, PROMPT), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def step():
        first = []

        def on_token(_tokens=None):
            if not first:
                first.append(time.perf_counter())

        start = time.perf_counter()
        with torch.inference_mode():
            if impl == "bunmyaku":
                from bunmyaku.models.generation import generate as bunmyaku_generate

                out = bunmyaku_generate(model, ids, mask, max_new_tokens=NEW, streamer=on_token, cache=cache)
            else:
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=NEW,
                    min_new_tokens=NEW,
                    do_sample=False,
                    streamer=_FirstTokenStreamer(on_token),
                    pad_token_id=0,
                )
        end = time.perf_counter()
        assert out.shape[1] == PROMPT + NEW, out.shape
        return {"ttft": first[0] - start, "decode_tps": config.batch * (NEW - 1) / (end - first[0])}

    return step, config.batch * NEW


class _FirstTokenStreamer:
    """transformers' streamer protocol: ``put`` gets the prompt first, then each new token."""

    def __init__(self, callback):
        self.callback, self.calls = callback, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.callback()

    def end(self):
        pass


def similarity(impl: str, config: Config, device: str, dtype: torch.dtype) -> tuple[Step, int]:
    sentences = similarity_sentences()
    path = model_dir("minilm")
    if impl == "bunmyaku":
        import bunmyaku

        pipe = bunmyaku.pipeline("sentence-similarity", model=path, device=device, batch_size=config.batch, dtype=dtype)

        def step():
            pipe.encode(sentences)

    else:
        import transformers

        from bunmyaku.models.pooling import mean_pool

        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()

        def step():  # the loop a transformers user writes: batches in the order given
            with torch.inference_mode():
                for i in range(0, len(sentences), config.batch):
                    batch = tokenizer(
                        sentences[i : i + config.batch],
                        padding=True,
                        truncation=True,
                        max_length=256,
                        return_tensors="pt",
                    ).to(device)
                    hidden = model(**batch).last_hidden_state
                    torch.nn.functional.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1).cpu()

    return step, len(sentences)


COMPILABLE = ("encoder-infer", "encoder-train")  # the scenarios that take ``Config.compile``

BUILDERS = {
    "encoder-infer": encoder_infer,
    "encoder-train": encoder_train,
    "generate": generate,
    "similarity": similarity,
}
