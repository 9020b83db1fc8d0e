"""Text generation with a decoder (GPT-2, Llama / SmolLM2): prompts or chat messages in, text out.

Prompts of different lengths are left-padded into one batch (positions skip the padding, so a prompt
generates the same text alone or in a batch). Chat messages go through the tokenizer's chat template.
Stop strings end a row as soon as its decoded continuation contains one; the text is cut before it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bunmyaku.models.generation import generate
from bunmyaku.pipelines.base import Pipeline, check_at_least

logger = logging.getLogger(__name__)
Messages = list[dict[str, str]]


class TextGenerationPipeline(Pipeline):
    """Generate continuations of prompts, or replies to chats.

    A prompt that leaves no room for ``max_new_tokens`` within the model's positions keeps its last tokens,
    with a warning.

    Args:
        model: a HF folder (or hub id) with a causal-LM checkpoint and tokenizer, or a GGUF file.
        device: where to run; default CUDA when available.
        dtype: model dtype ("float32" default; "bfloat16" on GPU is faster).
    """

    head = "causal-lm"

    def __init__(self, model: str | os.PathLike, device: str | None = None, dtype: str | None = None):
        super().__init__(model, device, dtype)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _prompt_text(self, item: str | Messages, add_generation_prompt: bool = True) -> str:
        if isinstance(item, str):
            return item
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.name} has no chat template; pass a plain prompt string instead of messages")
        return self.tokenizer.apply_chat_template(item, add_generation_prompt=add_generation_prompt)

    def _encode(self, prompts: list[str], chat: bool) -> dict[str, torch.Tensor]:
        # a chat template already holds the BOS / role tokens; a plain prompt gets the tokenizer's template
        batch = self.tokenizer(
            prompts, padding=True, padding_side="left", add_special_tokens=not chat, return_tensors="pt"
        )
        empty = [i for i, n in enumerate(batch["attention_mask"].sum(1).tolist()) if n == 0]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty: it has no tokens to continue; give some text")
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _fit(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> dict[str, torch.Tensor]:
        """Keep the last tokens of prompts too long for the model's positions plus ``max_new_tokens``."""
        limit = getattr(self.model.config, "max_seq_len", None)
        check_at_least("max_new_tokens", max_new_tokens, 0)
        T = batch["input_ids"].size(1)
        if not limit or T + max_new_tokens <= limit:
            return batch
        if max_new_tokens >= limit:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt: the model has {limit} positions"
            )
        keep = limit - max_new_tokens
        logger.warning(
            "the prompt has %d tokens; with max_new_tokens=%d the model's %d positions hold only its last %d",
            T,
            max_new_tokens,
            limit,
            keep,
        )
        return {k: v[:, -keep:] for k, v in batch.items()}

    def _stopper(self, start: int, stop: list[str]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not stop:
            return None

        def hit(tokens: torch.Tensor) -> torch.Tensor:
            texts = self.tokenizer.batch_decode(tokens[:, start:].tolist(), skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=tokens.device)

        return hit

    @torch.inference_mode()
    def __call__(
        self,
        inputs: str | Messages | list[str] | list[Messages],
        max_new_tokens: int = 64,
        stop: list[str] | None = None,
        return_full_text: bool = True,
        **generate_kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Generate for one prompt (or chat) or a list of them.

        Args:
            inputs: a prompt, a chat (list of ``{"role", "content"}``), or a list of either.
            max_new_tokens: the most tokens to add.
            stop: strings that end generation; the output is cut before the first one.
            return_full_text: include the prompt, as transformers does by default: ``generated_text`` is the
                prompt followed by the new text, or for a chat the messages followed by the assistant's reply
                (``{"role": "assistant", "content": ...}``). False: the new text alone.
            generate_kwargs: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
                ``num_beams``, ``seed``, ``cache`` ("graph" on CUDA replays each step as a CUDA graph; see
                :func:`bunmyaku.models.generation.generate`).

        Returns:
            For one input, ``[{"generated_text": ...}]``; for a list, one such list per input (as transformers).
        """
        single = isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], dict))
        items = [inputs] if single else list(inputs)
        chat = not isinstance(items[0], str)
        prompts = [self._prompt_text(item) for item in items]
        batch = self._fit(self._encode(prompts, chat), max_new_tokens)
        T = batch["input_ids"].size(1)
        stop = list(stop or [])
        out = generate(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            eos_token_id=self._eos_ids(),
            pad_token_id=self.tokenizer.pad_token_id,
            stop=self._stopper(T, stop),
            **generate_kwargs,
        )
        texts = self.tokenizer.batch_decode(out[:, T:].tolist(), skip_special_tokens=True)
        results = []
        for item, text in zip(items, texts, strict=True):
            results.append(
                [{"generated_text": _full_text(item, _cut(text, stop)) if return_full_text else _cut(text, stop)}]
            )
        return results[0] if single else results

    def stream(self, prompt: str | Messages, max_new_tokens: int = 64, **generate_kwargs: Any) -> Iterator[str]:
        """Yield the text as it is generated, piece by piece (greedy or sampled, one prompt)."""
        import queue
        import threading

        batch = self._fit(self._encode([self._prompt_text(prompt)], chat=not isinstance(prompt, str)), max_new_tokens)
        pieces: queue.Queue = queue.Queue()
        generated: list[int] = []
        failed: list[BaseException] = []

        def on_token(ids: torch.Tensor) -> None:
            generated.append(int(ids[0]))
            pieces.put(self.tokenizer.decode(generated, skip_special_tokens=True))

        def run() -> None:
            try:
                with torch.inference_mode():
                    generate(
                        self.model,
                        batch["input_ids"],
                        batch["attention_mask"],
                        max_new_tokens=max_new_tokens,
                        eos_token_id=self._eos_ids(),
                        streamer=on_token,
                        **generate_kwargs,
                    )
            except BaseException as error:  # raised again in the caller's thread, not lost with this one
                failed.append(error)
            finally:
                pieces.put(None)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        shown = ""
        while (text := pieces.get()) is not None:
            # yield only text that is final: a trailing replacement char is half of a multi-byte character
            if not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        thread.join()
        if failed:
            raise failed[0]

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.model.config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, list) else {eos}
        return sorted(i for i in ids if i is not None)


def _full_text(item: str | Messages, text: str) -> str | Messages:
    """The prompt followed by the new text; for a chat, the messages followed by the assistant's reply."""
    if isinstance(item, str):
        return item + text
    return [*item, {"role": "assistant", "content": text}]


def _cut(text: str, stop: list[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
