"""Evaluation metrics: accuracy, F1, Matthews correlation; perplexity; GSM8K-style final-number match.

F1 is the F1 of class 1 for two classes (GLUE's convention for MRPC / QQP) and the macro average otherwise.
Matthews correlation uses the multi-class form (Gorodkin, 2004), which equals the binary phi coefficient
for two classes:

    MCC = (c * s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))

with c correct predictions, s samples, p_k / t_k how often class k is predicted / true.
"""

from __future__ import annotations

import math
import re

import torch


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """preds, labels: (n,) class indices."""
    cm = confusion(preds, labels, num_classes).double()
    n = cm.sum()
    correct = cm.diag().sum()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1_per = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    f1 = f1_per[1] if num_classes == 2 else f1_per.mean()
    t, p = cm.sum(1), cm.sum(0)
    denom = math.sqrt(float((n**2 - (p**2).sum()) * (n**2 - (t**2).sum())))
    mcc = float(correct * n - (p * t).sum()) / denom if denom > 0 else 0.0
    return {"accuracy": float(correct / n), "f1": float(f1), "mcc": mcc}


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer number of a GSM8K-style text: what follows '####' if present, else the last number.
    Commas and a trailing '.0' are dropped so that '1,000' == '1000' == '1000.0'."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    number = (found[0] if "####" in text else found[-1]).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions whose final number equals the reference's final number."""
    if not references:
        return 0.0
    hits = sum(1 for p, r in zip(predictions, references) if final_number(p) is not None
               and final_number(p) == final_number(r))
    return hits / len(references)
