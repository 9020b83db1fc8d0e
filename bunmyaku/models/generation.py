"""Text generation with a decoder: a prefill step over the prompt, then one token at a time off the KV cache.

Notation: B batch, T prompt length, N new tokens, V vocabulary.

    prefill:  logits, cache = model(prompt)                      (B, T) -> next-token logits (B, V)
    step:     logits, cache = model(last token, cache)           (B, 1) -> (B, V)
    choose:   repetition penalty -> greedy argmax, or temperature -> top-k -> top-p -> sample

Any decoder works whose ``forward`` takes ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values`` and ``use_cache`` by keyword and returns ``logits`` and ``past_key_values``
(bunmyaku's Llama and GPT-2). Prompts of different lengths go in one batch left-padded, with an
``attention_mask``: positions count from each row's first real token, so a row generates the same
tokens alone or in a batch.

Greedy decoding, sampling, and beam search (:func:`beam_search`, shared with the encoder-decoder
Transformer). Stop strings are left to the caller, through the ``stop`` callback.

Per-token overhead is kept low: a decoder that takes ``logits_to_keep`` projects only the last position
onto the vocabulary (the prefill would otherwise compute (B, T, V) logits to read one row); the output
ids and the attention mask are allocated once for the whole run; ``cache="static"`` pre-allocates the
KV cache instead of growing it by concatenation at every step. ``cache="graph"`` goes further for GPUs,
where a small model's decoding step is bound by launching its few hundred kernels from Python, not by the
arithmetic: every step gets the same shapes and addresses (the static cache read at all its positions under
the attention mask, the inputs copied into fixed buffers), so the step is captured once as a CUDA graph and
replayed for each token. Off CUDA the same fixed-shape step runs eagerly (slower than "static"; it exists
there so the path is tested everywhere). On a CPU in float32, batched decoding (2 or more rows, 16 or more new
tokens) reads weights that are re-laid out for oneDNN once per call (:func:`~bunmyaku.models.linear.packed_weights`:
a second copy of the weights while generating, freed at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Literal

import torch

from bunmyaku.models.attention import StaticKVCache, positions_from_mask
from bunmyaku.models.linear import packed_weights


def penalize_repeats(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): make every token already in the sequence less likely.

    A seen token's logit is divided by ``penalty`` when positive and multiplied by it when negative, so
    ``penalty > 1`` always lowers it.

    Args:
        logits: (B, V) next-token logits.
        tokens: (B, S) the sequence so far, prompt included.
        mask: (B, S) 1 on real tokens (padding is not counted as seen).
        penalty: > 0; 1 changes nothing.

    Returns:
        (B, V)
    """
    counts = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, tokens, mask.long())
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row, -inf elsewhere (ties with the k-th are kept)."""
    kth = logits.topk(min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the most likely tokens whose probabilities sum to >= p.

    A token is dropped when the tokens more likely than it already reach ``p``; the most likely token is
    always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of the tokens ranked above each one
    drop = (mass_before >= p).scatter(1, order, mass_before >= p)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature), restricted to the top-k, then the top-p.

    Args:
        logits: (B, V) next-token logits.

    Returns:
        (B,) token ids.
    """
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` for a decoder whose forward takes it, else nothing (any decoder still works)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def decoding_weights(rows: int, new_tokens: int) -> contextlib.AbstractContextManager:
    """The weights a decoding loop of ``rows`` sequences reads: packed for oneDNN when that repays its cost.

    Packing all weights takes about as long as 4 batched decoding steps and saves a quarter of each step's
    time on the 2-core EPYC (BENCHMARKS.md); one row gains nothing from it.
    """
    return packed_weights(rows) if rows >= 2 and new_tokens >= 16 else contextlib.nullcontext()


def check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, num_beams) -> None:
    """Refuse options out of range up front, naming the option (``num_beams=0`` would otherwise run greedy)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams} (1 is greedy search or sampling)")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    seed: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    cache: Literal["dynamic", "static", "graph"] = "dynamic",
    min_new_tokens: int = 0,
    bad_token_ids: list[int] | None = None,
    early_stopping: bool = False,
    num_return_sequences: int = 1,
) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a decoder with a KV cache (see the module docstring); put it in eval mode first.
        input_ids: (B, T) prompts, left-padded when their lengths differ.
        attention_mask: (B, T) 1 for real tokens, 0 for padding; default all ones.
        max_new_tokens: N, the most tokens to add.
        do_sample: sample from the (filtered) distribution; False takes the argmax (greedy).
        temperature: divide the logits by this before sampling (< 1 sharper, > 1 flatter).
        top_k: sample among the k most likely tokens only.
        top_p: sample among the most likely tokens whose probabilities sum to ``top_p``.
        repetition_penalty: > 1 discourages tokens already in the sequence (prompt included).
        eos_token_id: token(s) that end a row; a finished row is filled with ``pad_token_id`` while the
            others go on, and generation stops when every row has finished.
        pad_token_id: fills finished rows; default the (first) EOS id.
        stop: called after every step with the (B, S) sequences so far, prompts included; returns (B,) bools,
            True for the rows that are done, which then finish as if they had produced EOS (the text-generation
            pipeline builds its stop strings on this).
        streamer: called after every step with the (B,) new token ids, e.g. to print text as it comes.
        seed: seeds a private random generator, so sampling is reproducible without touching the global one.
        num_beams: > 1 runs beam search (no sampling, streaming or repetition penalty with it).
        length_penalty: beam search scores a finished beam sum(log p) / generated_length ** length_penalty.
        cache: "dynamic" grows the KV cache step by step; "static" allocates it once for T + N positions
            (:class:`~bunmyaku.models.attention.StaticKVCache`): the same tokens, no copying per step;
            "graph": the static cache with fixed-shape decoding steps, replayed as one CUDA graph per token on
            CUDA (see the module docstring); beam search treats it as "static".
        min_new_tokens: the end tokens cannot be chosen before this many tokens are generated.
        bad_token_ids: ids never generated.
        early_stopping: beam search stops an input as soon as it holds ``num_beams`` finished hypotheses.
        num_return_sequences: beam search returns this many best hypotheses per prompt (<= ``num_beams``),
            rows ``b * R`` to ``b * R + R - 1`` for prompt b, best first.

    Returns:
        (B, T + n) the prompts followed by the n <= N generated tokens ((B * R, T + n) with beams and R).

    Raises:
        ValueError: an argument out of range.
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, num_beams)
    if cache not in ("dynamic", "static", "graph"):
        raise ValueError(f"cache must be 'dynamic', 'static' or 'graph', got {cache!r}")
    device = input_ids.device
    (B, T), N = input_ids.shape, max_new_tokens
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if num_return_sequences != 1 and not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences ({num_return_sequences}) must be between 1 and num_beams ({num_beams}); to draw "
            "several samples per prompt, repeat the prompt"
        )
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if num_beams > 1:
        if do_sample or streamer is not None or repetition_penalty != 1.0 or stop is not None:
            raise ValueError("num_beams > 1 cannot be combined with do_sample, streamer, stop or repetition_penalty")
        rules = BeamRules(length_penalty, min_new_tokens, bad_token_ids, early_stopping, num_return_sequences)
        return _decoder_beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, rules, eos, pad, cache)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    keep = _last_logits_only(model)
    # The whole run's ids and mask, allocated once; step i reads and writes the first T + i columns.
    tokens = torch.cat([input_ids, input_ids.new_full((B, N), pad)], dim=1)  # (B, T + N)
    mask = torch.cat([attention_mask, attention_mask.new_ones(B, N)], dim=1)  # (B, T + N)
    kv = StaticKVCache(T + N) if cache in ("static", "graph") else None
    fixed_step = None
    step_ids, length = input_ids, T
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    with decoding_weights(B, N):  # CPU: packed weights for batched decoding
        while length < T + N:
            if fixed_step is not None:
                logits = fixed_step(step_ids, length)  # (B, V)
            else:
                new = step_ids.size(1)
                out = model(
                    input_ids=step_ids,
                    attention_mask=mask[:, :length],
                    position_ids=positions_from_mask(mask[:, :length], new, length - new, device),
                    past_key_values=kv,
                    use_cache=True,
                    **keep,
                )
                kv = out.past_key_values
                logits = out.logits[:, -1].float()  # (B, V)
                if cache == "graph":  # the prompt is in the cache: the one-token steps from here on have fixed shapes
                    fixed_step = FixedShapeStep(model, kv, mask, length, keep)
            if repetition_penalty != 1.0:
                logits = penalize_repeats(logits, tokens[:, :length], mask[:, :length], repetition_penalty)
            logits = forbid(logits, bad_token_ids, eos if length - T < min_new_tokens else None)
            if do_sample:
                next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            else:
                next_ids = logits.argmax(dim=-1)  # (B,)
            next_ids = next_ids.masked_fill(finished, pad)
            finished |= torch.isin(next_ids, eos)
            tokens[:, length] = next_ids
            length += 1
            if stop is not None:
                finished |= stop(tokens[:, :length]).to(device=device, dtype=torch.bool)
            if streamer is not None:
                streamer(next_ids)
            if bool(finished.all()):
                break
            step_ids = next_ids[:, None]  # (B, 1)
    return tokens[:, :length].contiguous()


@functools.cache
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the warm-up before a graph capture, reused by every call.

    Each stream that runs a GEMM gets its own cuBLAS workspace (tens of MB on recent GPUs), held by the
    allocator until the process ends: a fresh stream per ``generate`` call would keep one more per call.
    """
    return torch.cuda.Stream(device)


class FixedShapeStep:
    """A one-token decoding step whose shapes and buffers never change, replayed as a CUDA graph on CUDA.

    The inputs live in fixed buffers: the new token ids (B, 1), the attention mask over all T + N positions
    (zeros after the last real one, which hides the cache slots not yet written) and the cache slot to write,
    a (1,) device tensor that the static cache reads as ``write_index``. Positions come from the mask (real
    tokens so far, minus one), so nothing in the step depends on a Python number that changes per token.
    On CUDA the first call warms the step up on a side stream (building lazily cached weights, such as the
    fused q/k/v) and captures it; every call then copies its inputs into the buffers and replays the graph.

    Args:
        model: the decoder, after the prefill filled ``cache``.
        cache: a :class:`StaticKVCache` holding the prompt.
        mask: (B, T + N) the run's attention mask (prompt mask, then ones).
        length: the number of positions filled (the prompt length T).
        keep: extra keyword arguments for the model (``logits_to_keep``).
    """

    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, mask: torch.Tensor, length: int, keep: dict):
        self.model, self.cache, self.keep = model, cache, keep
        self.full_mask = mask
        self.mask = mask.clone()
        self.mask[:, length:] = 0
        self.ids = torch.zeros(mask.size(0), 1, dtype=torch.long, device=mask.device)
        self.index = torch.zeros(1, dtype=torch.long, device=mask.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        positions = self.mask.sum(dim=-1, keepdim=True) - 1  # (B, 1) the new token's position in each row
        self.cache.write_index = self.index
        try:
            out = self.model(
                input_ids=self.ids,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                **self.keep,
            )
        finally:
            self.cache.write_index = None
        return out.logits[:, -1].float()  # (B, V)

    def __call__(self, step_ids: torch.Tensor, length: int) -> torch.Tensor:
        """step_ids (B, 1): the tokens at column ``length - 1``; returns the next-token logits (B, V)."""
        slot = length - 1
        self.ids.copy_(step_ids)
        self.index.fill_(slot)
        self.mask[:, slot] = self.full_mask[:, slot]
        if not self.ids.is_cuda:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()

    def _capture(self) -> None:
        # Warm-up runs write the same keys and values to the same slot as the captured step will: harmless.
        side = _warmup_stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()


def _decoder_step(model: torch.nn.Module, attention_mask: torch.Tensor, cache: StaticKVCache | None):
    """A decoder's next-token function for :func:`beam_search`, with its cache and growing mask."""
    state: dict = {"cache": cache, "mask": attention_mask, "started": False}
    keep = _last_logits_only(model)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        mask, cache = state["mask"], state["cache"]
        grow = tokens.size(1) - mask.size(1)
        mask = state["mask"] = torch.cat([mask, mask.new_ones(mask.size(0), grow)], dim=1) if grow else mask
        step_ids = tokens[:, -1:] if state["started"] else tokens
        positions = positions_from_mask(mask, step_ids.size(1), tokens.size(1) - step_ids.size(1), tokens.device)
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
        state["cache"], state["started"] = out.past_key_values, True
        return out.logits[:, -1].float()

    def reorder(rows: torch.Tensor) -> None:
        state["cache"].reorder(rows)
        state["mask"] = state["mask"].index_select(0, rows)

    return step, reorder


def _decoder_beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, rules, eos, pad, cache):
    kv = StaticKVCache(input_ids.size(1) + max_new_tokens) if cache in ("static", "graph") else None
    step, reorder = _decoder_step(model, attention_mask.repeat_interleave(num_beams, dim=0), kv)
    with decoding_weights(input_ids.size(0) * num_beams, max_new_tokens):
        return beam_search(
            step,
            reorder,
            input_ids.repeat_interleave(num_beams, dim=0),
            num_beams,
            max_new_tokens,
            eos,
            pad,
            rules,
        )


@dataclasses.dataclass(frozen=True)
class BeamRules:
    """Beam search's options beyond the beam count (see :func:`beam_search`)."""

    length_penalty: float = 1.0
    min_new_tokens: int = 0
    bad_token_ids: list[int] | None = None
    early_stopping: bool = False
    num_return_sequences: int = 1


def forbid(logits: torch.Tensor, bad_token_ids: list[int] | None, eos: torch.Tensor | None) -> torch.Tensor:
    """(B, V) logits (or log-probabilities) with the bad ids, and the end ids when given, set to -inf.

    The end ids are forbidden while fewer than ``min_new_tokens`` tokens have been generated, as HF's
    ``MinNewTokensLengthLogitsProcessor`` does.
    """
    banned = list(bad_token_ids or []) + ([] if eos is None else eos.tolist())
    if banned:
        logits = logits.clone()
        logits[:, banned] = -math.inf
    return logits


def beam_search(
    step: Callable[[torch.Tensor], torch.Tensor],
    reorder: Callable[[torch.Tensor], None],
    tokens: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    eos: torch.Tensor,
    pad_token_id: int = 0,
    rules: BeamRules = BeamRules(),
) -> torch.Tensor:
    """Keep the N best partial sequences per input; collect the N best finished ones; return the best.

    The rules follow ``transformers``' beam search with its defaults (``early_stopping=False``), so the two
    produce the same tokens. Each step ranks the W best continuations (2N, plus N per extra end token, so
    that N can always keep running). Those among the first N that end (an end token, or the length limit)
    become finished hypotheses scored sum(log p) / generated_length ** length_penalty; the N best that did
    not end keep running. An input is done once it holds N finished hypotheses and its best running beam,
    length-penalised now, cannot beat the worst of them (with ``early_stopping``, as soon as it holds N).

    Args:
        step: (B * N, L) sequences so far -> (B * N, V) float logits of the next token (it owns the cache).
        reorder: called with the (B * N,) rows the surviving beams come from, to reorder the cache.
        tokens: (B * N, L0) the start of every beam: each input's start repeated N times.
        num_beams: N.
        max_new_tokens: the most tokens added.
        eos: (E,) end-of-sequence ids.
        pad_token_id: fills the tail of shorter results.
        rules: length penalty, min new tokens, bad ids, early stopping, sequences returned (:class:`BeamRules`).

    Returns:
        (B * R, L0 + n) the R best finished sequences per input (best first), right-padded.
    """
    N, device = num_beams, tokens.device
    B = tokens.size(0) // N
    width = max(2, 1 + len(eos)) * N
    # All beams start identical; only the first is live, so the first step does not pick N copies of one token.
    running = torch.zeros(B, N, device=device)
    running[:, 1:] = -1e9
    hypotheses: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]  # best first, at most N
    open_inputs = [True] * B
    for i in range(max_new_tokens):
        length, is_last = i + 1, i == max_new_tokens - 1
        log_probs = step(tokens).log_softmax(-1)  # (B * N, V)
        log_probs = forbid(log_probs, rules.bad_token_ids, eos if i < rules.min_new_tokens else None)
        V = log_probs.size(-1)
        scores = (running[:, :, None] + log_probs.view(B, N, V)).view(B, N * V)
        top_scores, top_index = scores.topk(width, dim=-1)  # (B, W)
        source_beam = top_index // V + torch.arange(B, device=device)[:, None] * N  # rows of ``tokens``
        candidates = torch.cat([tokens[source_beam.view(-1)], (top_index % V).view(-1, 1)], dim=1)
        candidates = candidates.view(B, width, -1)  # (B, W, L + 1)
        ended = torch.isin(top_index % V, eos) | is_last  # (B, W)
        finished_scores = top_scores / length**rules.length_penalty
        for b in range(B):
            if open_inputs[b]:
                new = [(finished_scores[b, r].item(), candidates[b, r]) for r in range(N) if ended[b, r]]
                hypotheses[b] = sorted(hypotheses[b] + new, key=lambda h: -h[0])[:N]
        alive_scores = top_scores + ended.float() * -1e9  # an ended continuation stops running
        keep = alive_scores.topk(N, dim=-1).indices  # (B, N)
        running = alive_scores.gather(1, keep)
        rows = source_beam.gather(1, keep).view(-1)
        tokens = candidates.gather(1, keep[:, :, None].expand(-1, -1, candidates.size(-1))).view(B * N, -1)
        reorder(rows)
        best_running = running[:, 0] / length**rules.length_penalty
        for b in range(B):
            if len(hypotheses[b]) == N and (rules.early_stopping or best_running[b].item() <= hypotheses[b][-1][0]):
                open_inputs[b] = False
        if is_last or not any(open_inputs):
            break
    best = [hyp[1] for hyps in hypotheses for hyp in hyps[: rules.num_return_sequences]]
    out = torch.full((len(best), max(len(t) for t in best)), pad_token_id, dtype=torch.long, device=device)
    for b, t in enumerate(best):
        out[b, : len(t)] = t
    return out
