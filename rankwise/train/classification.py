"""Sequence classification: one text or a text pair per row, labels as integers or strings.

The label set is `config.labels` when given, else every label seen in the training file, sorted (numerically
when all are integers). A label in the evaluation file outside that set is an error naming its line.
The model is `AutoModelForSequenceClassification` with a new head, trained in full (modules_to_save).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.train.data import DataError, read_table
from rankwise.train.metrics import classification_metrics
from rankwise.train.models import load_model, load_tokenizer
from rankwise.train.tasks import Example, Task, register_task

TEXT_NAMES = ("sentence", "text", "sentence1", "question1", "#1 String", "premise", "question")
PAIR_NAMES = ("sentence2", "question2", "#2 String", "hypothesis")
LABEL_NAMES = ("label", "labels", "Quality", "gold_label")
HEAD_NAMES = ("classifier", "score")


def _label_order(values: set[str]) -> list[str]:
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


@register_task
class Classification(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    primary_metric = "accuracy"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.labels: list[str] | None = list(config.labels) if config.labels else None

    def read(self, path: str, limit: int | None, *, train: bool) -> list[Example]:
        cfg = self.config
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(cfg.model)
        wanted = tuple(c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column) if c and not c.isdigit())
        table = read_table(path, cfg.format, cfg.header, header_names=wanted + TEXT_NAMES + LABEL_NAMES, limit=limit)
        text_key = table.resolve("text", cfg.text_column, TEXT_NAMES)
        pair_key = table.resolve("text_pair", cfg.text_pair_column, PAIR_NAMES, required=False)
        label_key = table.resolve("label", cfg.label_column, LABEL_NAMES)
        rows = [(row, table.value(row, label_key, role="label").strip()) for row in table.rows]
        if train and self.labels is None:
            self.labels = _label_order({label for _, label in rows})
            if len(self.labels) < 2:
                raise DataError(f"{path}: every row has the label {self.labels[0]!r}; a classifier needs at "
                                "least two classes (check --label-column).")
        index = {label: i for i, label in enumerate(self.labels or [])}
        texts, pairs, targets = [], [], []
        for row, label in rows:
            if label not in index:
                raise DataError(f"{table.where(row)}: label {label!r} is not one of {self.labels}. Fix the row, or "
                                "list every label with --labels (the training file fixes the set otherwise).")
            texts.append(table.value(row, text_key, role="text"))
            if pair_key is not None:
                pairs.append(table.value(row, pair_key, role="second text"))
            targets.append(index[label])
        enc = self.tokenizer(texts, pairs or None, truncation=True, max_length=cfg.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "labels": targets[i]} for i in range(len(texts))]

    def load_model(self) -> nn.Module:
        assert self.labels is not None, "read the training file before loading the model"
        model = load_model(
            self.config.model, "AutoModelForSequenceClassification", num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)), label2id={label: i for i, label in enumerate(self.labels)},
        )
        if getattr(model.config, "pad_token_id", None) is None:  # decoder models pool at the last non-pad token
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def modules_to_save(self, model: nn.Module) -> list[str] | None:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        heads = [h for h in HEAD_NAMES if h in names]
        return heads[:1] or None

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example]) -> dict[str, float]:
        model.eval()
        preds, golds, losses = [], [], []
        for batch in self.batches(examples, self.config.eval_batch_size):
            out = model(**batch)
            preds.append(out.logits.argmax(-1))
            golds.append(batch["labels"])
            losses.append(float(out.loss) * len(batch["labels"]))
        preds_t, golds_t = torch.cat(preds), torch.cat(golds)
        metrics = classification_metrics(preds_t, golds_t, len(self.labels))
        metrics["loss"] = sum(losses) / len(golds_t)
        return metrics
