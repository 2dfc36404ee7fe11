"""Tasks: classification (pairs, string labels, unknown labels) and causal LM (response-only loss, chat template,
GSM8K-style generation), each through a short real run."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.train.config import TrainConfig
from rankwise.train.data import DataError
from rankwise.train.runner import train
from rankwise.train.tasks import make_task


def cls_config(model, train_file, out, **kw) -> TrainConfig:
    return TrainConfig(**{
        "model": str(model), "train_file": str(train_file), "output_dir": str(out), "method": "fixed",
        "budget": "r2", "steps": 4, "batch_size": 8, "max_length": 24, "progress": False, "plot": False,
        "tensorboard": False, **kw,
    })


def test_text_pairs_with_string_labels(tmp_path, cls_model_dir):
    rows = [("the film was good", "a great movie", "entailment"), ("the plot was dull", "a fun film", "contradiction"),
            ("very good", "is fine", "entailment"), ("bad film", "lovely plot", "contradiction")] * 4
    path = tmp_path / "pairs.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(f"{i}\t{a}\t{b}\t{y}\n"
                                                                      for i, (a, b, y) in enumerate(rows)))
    cfg = cls_config(cls_model_dir, path, tmp_path / "out", eval_file=str(path))
    task = make_task(cfg)
    examples = task.read(str(path), None, train=True)
    assert task.labels == ["contradiction", "entailment"]
    assert examples[0]["labels"] == 1 and examples[1]["labels"] == 0
    assert examples[0]["input_ids"].count(task.tokenizer.sep_token_id) == 2  # the second text is there
    summary = train(cfg)
    assert set(summary["eval"]) == {"accuracy", "f1", "mcc", "loss"}
    meta = json.loads((tmp_path / "out" / "adapter" / "rankwise.json").read_text())
    assert meta["labels"] == ["contradiction", "entailment"]
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]


def test_unknown_eval_label_names_file_and_line(tmp_path, cls_model_dir, sst_files):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\ngood film\t1\nbad film\tneutral\n")
    cfg = cls_config(cls_model_dir, sst_files[0], tmp_path / "out", eval_file=str(dev))
    with pytest.raises(DataError, match=r"dev.tsv, line 3: label 'neutral' is not one of \['0', '1'\].*--labels"):
        train(cfg)


def test_numeric_labels_sort_as_numbers(tmp_path, cls_model_dir):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"film {w}", "label": y}) + "\n"
                            for w, y in [("good", 10), ("bad", 2), ("fun", 1), ("dull", 2)]))
    task = make_task(cls_config(cls_model_dir, path, tmp_path / "out"))
    task.read(str(path), None, train=True)
    assert task.labels == ["1", "2", "10"]


def test_causal_lm_loss_is_on_the_response_only(tmp_path, lm_model_dir, math_files):
    cfg = TrainConfig(model=str(lm_model_dir), train_file=str(math_files[0]), task="causal-lm", method="fixed",
                      output_dir=str(tmp_path / "out"), max_length=32, progress=False)
    task = make_task(cfg)
    ex = task.read(str(math_files[0]), 2, train=True)[0]
    tok = task.tokenizer
    n_prompt = ex["labels"].count(-100)
    prompt = tok.decode(ex["input_ids"][:n_prompt])
    answer = tok.decode(ex["input_ids"][n_prompt:])
    assert prompt.startswith("user what is") and prompt.rstrip().endswith("assistant")  # the chat template
    assert answer.endswith("</s>") and "####" in answer
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


def test_causal_lm_run_reports_perplexity_and_exact_match(tmp_path, lm_model_dir, math_files):
    cfg = TrainConfig(model=str(lm_model_dir), train_file=str(math_files[0]), eval_file=str(math_files[1]),
                      task="causal-lm", method="fixed", budget="r2", steps=3, batch_size=8, max_length=32,
                      eval_generate=4, max_new_tokens=6, output_dir=str(tmp_path / "out"), progress=False,
                      plot=False, tensorboard=False)
    summary = train(cfg)
    ev = summary["eval"]
    assert ev["perplexity"] == pytest.approx(torch.tensor(ev["loss"]).exp().item(), rel=1e-5)
    assert 0.0 <= ev["exact_match"] <= 1.0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None


def test_alpaca_layout_without_chat_template(tmp_path, lm_model_dir, math_files):
    cfg = TrainConfig(model=str(lm_model_dir), train_file=str(math_files[0]), task="causal-lm", method="fixed",
                      output_dir=str(tmp_path / "out"), progress=False)
    task = make_task(cfg)
    task.read(str(math_files[0]), 1, train=True)
    task.tokenizer.chat_template = None
    text = task.prompt_text("what is 1 plus 2", "")
    assert text == "### Instruction:\nwhat is 1 plus 2\n\n### Response:\n"
    assert "### Input:\nx\n\n" in task.prompt_text("q", "x")
