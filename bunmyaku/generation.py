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

Greedy decoding and sampling only: beam search and a static (pre-allocated, CUDA-graph friendly) cache
are not implemented yet; stop strings are left to the caller, through the ``stop`` callback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bunmyaku.models.attention import positions_from_mask


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


def _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
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

    Returns:
        (B, T + n) the prompts followed by the n <= N generated tokens.

    Raises:
        ValueError: an argument out of range.
    """
    _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
    device = input_ids.device
    B = input_ids.size(0)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens, step_ids, cache = input_ids, input_ids, None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        positions = positions_from_mask(attention_mask, step_ids.size(1), tokens.size(1) - step_ids.size(1), device)
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1].float()  # (B, V)
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, tokens, attention_mask, repetition_penalty)
        if do_sample:
            next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        else:
            next_ids = logits.argmax(dim=-1)  # (B,)
        next_ids = next_ids.masked_fill(finished, pad)
        finished |= torch.isin(next_ids, eos)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        if stop is not None:
            finished |= stop(tokens).to(device=device, dtype=torch.bool)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        if streamer is not None:
            streamer(next_ids)
        if bool(finished.all()):
            break
        step_ids = next_ids[:, None]  # (B, 1)
    return tokens
