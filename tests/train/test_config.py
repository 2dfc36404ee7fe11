"""TrainConfig: YAML + flags merge, types, unknown keys and impossible values named with the fix."""

from __future__ import annotations

import argparse

import pytest

from rankwise.train.config import TrainConfig, add_flags, flags_from_namespace


@pytest.fixture
def paths(cls_model_dir, sst_files):
    return {"model": str(cls_model_dir), "train_file": str(sst_files[0])}


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return flags_from_namespace(parser.parse_args(argv))


def test_flags_override_the_yaml_file(tmp_path, paths):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {paths['model']}\ntrain_file: {paths['train_file']}\nlr: 1e-3\n"
                        "batch-size: 4\ntarget_modules: [query, value]\nallocator_options: {interval: 5}\n")
    cfg = TrainConfig.from_sources(str(cfg_file), parse(["--lr", "2e-4", "--no-progress"]))
    assert cfg.lr == 2e-4 and cfg.batch_size == 4 and cfg.progress is False
    assert cfg.target_modules == ["query", "value"]
    assert cfg.allocator_options == {"interval": 5}


def test_flag_strings_become_typed_values(paths):
    flags = parse(["--model", paths["model"], "--train-file", paths["train_file"], "--target-modules", "query,value",
                   "--allocator-options", "interval=3,gamma=0.2", "--labels", "neg,pos", "--steps", "10",
                   "--grad-clip", "none", "--resume"])
    cfg = TrainConfig.from_dict(flags)
    assert cfg.target_modules == ["query", "value"]
    assert cfg.allocator_options == {"interval": 3, "gamma": 0.2}
    assert cfg.labels == ["neg", "pos"] and cfg.steps == 10 and cfg.grad_clip is None
    assert cfg.resume == "latest"


def test_target_modules_regex_stays_a_string(paths):
    cfg = TrainConfig(**paths, target_modules=r".*\.layer\.0\..*")
    assert cfg.target_modules == r".*\.layer\.0\..*"
    assert TrainConfig(**paths, target_modules="attention.self.query").target_modules == ["attention.self.query"]


def test_unknown_yaml_key_names_it_and_the_allowed_keys(tmp_path, paths):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {paths['model']}\ntrain_file: {paths['train_file']}\nlearning_rate: 1e-3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]; allowed keys are \[.*'lr'"):
        TrainConfig.from_sources(str(cfg_file), {})


@pytest.mark.parametrize("key, value, message", [
    ("method", "magic", r"method='magic': must be one of \[.*'fixed'"),
    ("task", "translation", r"task='translation': must be one of \['causal-lm', 'classification'\]"),
    ("lr", -1, r"lr=-1.0: must be a number > 0"),
    ("budget", "lots", r"Budget 'lots' not understood"),
    ("batch_size", "eight", r"batch_size='eight'"),
    ("scheduler", "step", r"scheduler='step': must be one of"),
    ("init", "magic", r"init='magic'"),
])
def test_impossible_values_are_named(paths, key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**paths, **{key: value})


def test_hub_name_explains_how_to_pass_a_path(sst_files):
    with pytest.raises(FileNotFoundError, match=r"never downloads models.*local folder"):
        TrainConfig(model="HuggingFaceTB/SmolLM2-135M", train_file=str(sst_files[0]))


def test_missing_data_file_is_named(cls_model_dir):
    with pytest.raises(FileNotFoundError, match=r"train_file='nope.tsv': no such file"):
        TrainConfig(model=str(cls_model_dir), train_file="nope.tsv")


def test_model_and_train_file_are_required():
    with pytest.raises(ValueError, match=r"\['model', 'train_file'\] must be given"):
        TrainConfig.from_dict({"lr": 1e-3})
