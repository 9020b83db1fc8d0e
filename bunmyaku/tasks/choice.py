"""Multiple choice (JCommonsenseQA, SWAG) and GPT-style pair classification (Radford et al. 2018 §3.3).

Multiple choice encodes each (question, choice) pair as ``[CLS] question [SEP] choice [SEP]``; the model
scores every pair and a softmax over the N choices picks one (inputs (B, N, T), ``labels`` (B,)).

GPT has no segment embeddings and no [CLS]: GPT-1 fine-tunes with ``start context delimiter choice extract``
sequences, three new tokens learned during fine-tuning, and reads each choice's score at its ``extract``
token (``GPT2DoubleHeadsModel``, ``mc_token_ids``). The same layout classifies a pair (entailment,
paraphrase) when the "choices" are the candidate second texts.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bunmyaku.data.tables import DataError, where
from bunmyaku.tasks.base import Feature, Task, model_inputs
from bunmyaku.tasks.metrics import accuracy

GPT_TOKENS = {"start": "<|start|>", "delimiter": "<|delimiter|>", "extract": "<|extract|>"}


class MultipleChoice(Task):
    """N candidate answers per question (``choice_columns``); ``label_column`` holds the right one's index."""

    name = "multiple-choice"
    head = "multiple-choice"

    def columns(self, labelled: bool) -> list[str]:
        s = self.settings
        return [s.text_column, *self.choice_columns()] + ([s.label_column] if labelled else [])

    def choice_columns(self) -> list[str]:
        """The columns holding the choices."""
        columns = self.settings.choice_columns
        names = columns.split(",") if isinstance(columns, str) else list(columns or [])
        if len(names) < 2:
            raise ValueError(f"multiple choice needs at least two --choice-columns, got {columns!r}")
        return [n.strip() for n in names]

    def num_labels(self) -> int | None:
        return None

    def check_labels(self, examples: list[dict[str, Any]], source: str) -> None:
        for example in examples:
            self._target(example, source)

    def _target(self, example: dict[str, Any], source: str) -> int:
        value = example[self.settings.label_column]
        n = len(self.choice_columns())
        try:
            label = int(value)
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < n:
            raise DataError(f"{where(example, source)}: label {value!r} is not a choice index in 0..{n - 1}")
        return label

    def encode(self, tokenizer, examples, labelled=True, source=""):
        s, columns = self.settings, self.choice_columns()
        firsts = [str(e[s.text_column]) for e in examples for _ in columns]
        seconds = [str(e[c]) for e in examples for c in columns]
        enc = tokenizer(firsts, seconds, truncation=True, max_length=s.max_length, return_tensors=None)
        n = len(columns)
        features = []
        for i, example in enumerate(examples):
            rows = range(i * n, (i + 1) * n)
            feature = {
                k: [enc[k][r] for r in rows] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc
            }
            feature["example"] = i
            if labelled:
                feature["labels"] = self._target(example, source)
            features.append(feature)
        return features

    def metrics(self, examples, features, outputs):
        predicted = [int(o.argmax()) for o in outputs]
        return {"accuracy": accuracy([f["labels"] for f in features], predicted)}

    def predictions(self, examples, features, outputs):
        columns = self.choice_columns()
        records = []
        for example, scores in zip(examples, outputs, strict=True):
            best = int(scores.argmax())
            record = {"text": example[self.settings.text_column], "label": best, "choice": example[columns[best]]}
            record["scores"] = [round(float(x), 6) for x in scores.float().softmax(-1)]
            if self.settings.label_column in example:
                record["gold"] = example[self.settings.label_column]
            records.append(record)
        return records


class GPTPairClassification(MultipleChoice):
    """GPT-1's input transformation: ``start text delimiter choice extract`` per choice, scored at ``extract``.

    The three tokens are added to the tokenizer and the model's token embeddings grow to hold them (new rows
    start at the mean embedding). ``lm_weight`` > 0 adds GPT-1's auxiliary language-modelling loss.
    """

    name = "pair-classification"
    head = "pair-classification"

    def prepare_model(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        tokenizer.add_special_tokens({"additional_special_tokens": list(GPT_TOKENS.values())})
        if len(tokenizer) > model.config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
        return super().prepare_model(model, tokenizer)

    def encode(self, tokenizer, examples, labelled=True, source=""):
        s, columns = self.settings, self.choice_columns()
        start, delim, extract = (tokenizer.convert_tokens_to_ids(t) for t in GPT_TOKENS.values())
        texts = tokenizer([str(e[s.text_column]) for e in examples], add_special_tokens=False, return_tensors=None)
        choices = tokenizer(
            [str(e[c]) for e in examples for c in columns], add_special_tokens=False, return_tensors=None
        )
        n = len(columns)
        features = []
        for i, example in enumerate(examples):
            rows = []
            for j in range(n):
                choice = choices["input_ids"][i * n + j][: s.max_length // 2]
                room = s.max_length - len(choice) - 3
                rows.append([start, *texts["input_ids"][i][:room], delim, *choice, extract])
            feature: Feature = {
                "input_ids": rows,
                "attention_mask": [[1] * len(r) for r in rows],
                "mc_token_ids": [len(r) - 1 for r in rows],
                "example": i,
            }
            if labelled:
                feature["mc_labels"] = self._target(example, source)
                if s.lm_weight > 0:
                    feature["labels"] = rows  # LM targets, shifted inside the model; padding is -100
            features.append(feature)
        return features

    def forward(self, model, batch):
        out = model(**model_inputs(batch))
        loss = out.mc_loss
        if loss is not None and out.loss is not None:
            loss = loss + self.settings.lm_weight * out.loss
        return loss, out.mc_logits.detach()

    def metrics(self, examples, features, outputs):
        predicted = [int(o.argmax()) for o in outputs]
        return {"accuracy": accuracy([f["mc_labels"] for f in features], predicted)}
