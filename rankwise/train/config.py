"""`TrainConfig`: everything one `rankwise train` run needs, typed and validated when built.

A run is described by a YAML file, by command-line flags, or both (flags override the file). Every field
below is a key of the file and a flag (`lr` -> `--lr`, `train_file` -> `--train-file`); an unknown key is an
error naming it and the allowed keys. `TrainConfig.from_sources(yaml_path, flags)` does the merge.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.train.defaults import DEFAULT_ALLOCATOR, DEFAULT_BUDGET

SCHEDULERS = ("linear", "cosine", "constant")
HEADER_MODES = ("auto", "yes", "no")
FORMATS = ("auto", "tsv", "csv", "json", "jsonl")
PRECISIONS = ("fp32", "bf16")


def _help(text: str, **kw: Any) -> dict[str, Any]:
    return {"metadata": {"help": text}, **kw}


@dataclass
class TrainConfig:
    """One training run. Columns are names (with a header row) or 0-based indices."""

    # ---- model and data ------------------------------------------------------------------------------
    model: str = field(**_help("local model folder (transformers format) or a .gguf file; never downloaded"))
    train_file: str = field(**_help("training data: .tsv, .csv, .json or .jsonl"))
    eval_file: str | None = field(default=None, **_help("evaluation data, same format as the training data"))
    task: str = field(default="classification", **_help("classification or causal-lm"))
    output_dir: str = field(default="runs/rankwise", **_help("where the adapter, logs, plots and checkpoints go"))
    format: str = field(default="auto", **_help("data format: auto (from the file extension), tsv, csv, json, jsonl"))
    header: str = field(default="auto", **_help("first row of a TSV/CSV is a header: auto, yes, no"))
    text_column: str | None = field(default=None, **_help("classification: the text column (name or index)"))
    text_pair_column: str | None = field(default=None, **_help("classification: the second text of a pair"))
    label_column: str | None = field(default=None, **_help("classification: the label column"))
    labels: list[str] | None = field(default=None, **_help("classification: label values in order (default: "
                                                            "those seen in the training data, sorted)"))
    instruction_column: str | None = field(default=None, **_help("causal-lm: instruction / prompt / question column"))
    input_column: str | None = field(default=None, **_help("causal-lm: optional extra input column"))
    output_column: str | None = field(default=None, **_help("causal-lm: output / response / answer column"))
    max_length: int = field(default=128, **_help("tokens per example (longer ones are truncated)"))
    max_train_samples: int | None = field(default=None, **_help("use only the first N training rows"))
    max_eval_samples: int | None = field(default=None, **_help("use only the first N evaluation rows"))

    # ---- method ----------------------------------------------------------------------------------------
    method: str = field(default=DEFAULT_ALLOCATOR, **_help("rank allocator: fixed or an adaptive one "
                                                           "(rankwise.allocate.available_allocators())"))
    init: str = field(default="default", **_help("adapter initialiser (rankwise.init.available_initializers())"))
    budget: str = field(default=DEFAULT_BUDGET, **_help("trainable adapter parameters ('300k', '1.2M') or average rank ('r8')"))
    init_rank: int | None = field(default=None, **_help("rank at injection (default: 2x the budget's average rank "
                                                        "for adaptive methods, the budget's rank for fixed)"))
    alpha: float | None = field(default=None, **_help("LoRA alpha (default: 2 x init_rank)"))
    dropout: float = field(default=0.0, **_help("LoRA dropout"))
    target_modules: list[str] | str = field(default="all-linear", **_help("module name suffixes (comma-separated), "
                                                                        "a regex, or all-linear"))
    min_rank: int = field(default=0, **_help("smallest rank an allocator may give a module"))
    max_rank: int | None = field(default=None, **_help("largest rank an allocator may give a module"))
    use_rslora: bool = field(default=False, **_help("scale by alpha / sqrt(r)"))
    use_dora: bool = field(default=False, **_help("DoRA magnitude vectors"))
    allocator_options: dict[str, Any] = field(default_factory=dict, **_help("allocator knobs as JSON or k=v,k=v"))
    init_options: dict[str, Any] = field(default_factory=dict, **_help("initialiser knobs as JSON or k=v,k=v"))

    # ---- optimisation ----------------------------------------------------------------------------------
    lr: float = field(default=5e-4, **_help("peak learning rate (AdamW)"))
    lr_ratio: float | None = field(default=None, **_help("LoRA+: learning rate of B = lr_ratio x lr"))
    weight_decay: float = field(default=0.0, **_help("AdamW weight decay"))
    scheduler: str = field(default="linear", **_help("learning-rate schedule after warmup: linear, cosine, constant"))
    warmup_ratio: float = field(default=0.06, **_help("fraction of steps with a linear warmup"))
    batch_size: int = field(default=16, **_help("training examples per micro-batch and process; an optimizer step "
                                                "takes batch_size x grad_accum x processes examples"))
    grad_accum: int = field(default=1, **_help("micro-batches per optimizer step (gradient accumulation; the loss of "
                                               "each is divided by grad_accum)"))
    precision: str = field(default="fp32", **_help("fp32, or bf16: forward under bfloat16 autocast, weights, adapters "
                                                   "and optimizer state in fp32"))
    gradient_checkpointing: bool = field(default=False, **_help("recompute activations during backward: less memory, "
                                                                "one more forward per step (transformers models)"))
    eval_batch_size: int = field(default=64, **_help("examples per evaluation batch"))
    steps: int | None = field(default=None, **_help("optimizer steps (default: from epochs)"))
    epochs: float = field(default=1.0, **_help("passes over the training data when steps is not given"))
    grad_clip: float | None = field(default=1.0, **_help("clip the gradient norm to this value (none: off)"))
    seed: int = field(default=0, **_help("seed for initialisation, data order and dropout"))
    threads: int | None = field(default=None, **_help("torch CPU threads (default: torch's choice)"))
    device: str = field(default="auto", **_help("where a one-process run trains: auto (the GPU when there is one), "
                                                "cpu, cuda or cuda:N; under torchrun each process takes its GPU"))

    # ---- evaluation, logging, checkpoints --------------------------------------------------------------
    eval_every: int = field(default=0, **_help("evaluate every N steps (0: only at the end)"))
    eval_generate: int = field(default=0, **_help("causal-lm: generate answers for N eval rows and score the final "
                                                  "number (GSM8K-style exact match)"))
    max_new_tokens: int = field(default=256, **_help("causal-lm: generation length for eval_generate"))
    save_every: int = field(default=0, **_help("write a resumable checkpoint every N steps (0: only on Ctrl-C)"))
    keep_checkpoints: int = field(default=2, **_help("how many recent checkpoints to keep"))
    log_every: int = field(default=10, **_help("write training metrics to the log every N steps"))
    tensorboard: bool = field(default=True, **_help("also log to TensorBoard when tensorboard is installed"))
    progress: bool = field(default=True, **_help("show a progress bar"))
    plot: bool = field(default=True, **_help("write rank plots (needs matplotlib)"))
    resume: str | None = field(default=None, **_help("continue from a checkpoint: 'latest' (in output_dir) or a "
                                                     "checkpoint folder"))

    def __post_init__(self) -> None:
        self._coerce()
        from rankwise.allocate import Budget, available_allocators
        from rankwise.init import available_initializers
        from rankwise.train.tasks import available_tasks

        choices = {
            "task": available_tasks(), "method": available_allocators(), "scheduler": SCHEDULERS,
            "header": HEADER_MODES, "format": FORMATS,
        }
        for name, allowed in choices.items():
            _require(getattr(self, name) in allowed, name, getattr(self, name), f"one of {sorted(allowed)}")
        base_init = self.init.partition("_niter_")[0]
        _require(base_init in available_initializers(), "init", self.init,
                 f"one of {available_initializers()} (or pissa_niter_<k>)")
        _require(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                             and self.device[5:].isdigit()),
                 "device", self.device, "auto, cpu, cuda or cuda:N")
        Budget.parse(self.budget, min_rank=self.min_rank, max_rank=self.max_rank)  # raises with the fix
        for name in ("max_length", "batch_size", "eval_batch_size"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "an integer > 0")
        for name in ("steps", "init_rank", "max_train_samples", "max_eval_samples", "threads"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, value, "an integer > 0 (or leave it unset)")
        for name in ("eval_every", "eval_generate", "save_every", "log_every", "min_rank"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _require(self.grad_accum >= 1, "grad_accum", self.grad_accum,
                 "an integer >= 1 (micro-batches per optimizer step; 1 turns accumulation off)")
        if self.precision in ("fp16", "float16"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: fp16 needs loss scaling, which rankwise train "
                             "does not do. Use bf16 (same memory and speed, no scaling; CPUs and Ampere or newer "
                             "GPUs) or fp32.")
        _require(self.precision in PRECISIONS, "precision", self.precision, f"one of {list(PRECISIONS)}")
        _require(self.lr > 0, "lr", self.lr, "a number > 0 (e.g. 5e-4)")
        _require(self.epochs > 0, "epochs", self.epochs, "a number > 0")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        _require(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        _require(self.lr_ratio is None or self.lr_ratio > 0, "lr_ratio", self.lr_ratio, "a number > 0 (LoRA+ uses 16)")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "a number > 0 or none")
        self._check_paths()

    def _check_paths(self) -> None:
        from rankwise.train.models import check_model_path

        check_model_path(self.model)
        for name in ("train_file", "eval_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name}={path!r}: no such file. Pass the path of a .tsv/.csv/.json/.jsonl file.")

    def _coerce(self) -> None:
        """Turn YAML / flag strings into the declared types (e.g. '5e-4' -> 5e-4, 'a,b' -> ['a', 'b'])."""
        # 'q_proj,v_proj' or 'self.query' are suffixes; a string with regex syntax stays one full-name regex
        spec = self.target_modules
        if isinstance(spec, str) and spec != "all-linear" and ("," in spec or not any(c in spec for c in "*[]()|^$+?\\")):
            self.target_modules = [s.strip() for s in spec.split(",") if s.strip()]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "target_modules" and isinstance(value, str):
                continue
            try:
                setattr(self, f.name, _coerce(value, _field_type(f.name)))
            except (TypeError, ValueError) as err:
                raise ValueError(f"TrainConfig.{f.name}={value!r}: {err}") from err

    # ---- sources ---------------------------------------------------------------------------------------
    @classmethod
    def allowed_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(cls.allowed_keys()))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; allowed keys are {cls.allowed_keys()}.")
        missing = [k for k in ("model", "train_file") if data.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{source}: {missing} must be given (e.g. --model ./my-model --train-file train.tsv).")
        return cls(**data)

    @classmethod
    def from_sources(cls, yaml_path: str | None, flags: dict[str, Any]) -> TrainConfig:
        """Values from the YAML file at `yaml_path` (if any), overridden by `flags` (only flags the user gave)."""
        data: dict[str, Any] = {}
        source = "flags"
        if yaml_path:
            data = load_yaml(yaml_path)
            source = f"{yaml_path} + flags"
            unknown = sorted({k.replace("-", "_") for k in data} - set(cls.allowed_keys()))
            if unknown:
                raise ValueError(f"{yaml_path}: unknown key(s) {unknown}; allowed keys are {cls.allowed_keys()}.")
        data.update(flags)
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def is_adaptive(self) -> bool:
        return self.method != "fixed"


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise FileNotFoundError(f"--config {path!r}: cannot read it ({err.strerror}).") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err}). Write one `key: value` per line.") from err
    if not isinstance(data, dict):  # a wrong file, not a wrong call: ValueError like every config error
        raise ValueError(  # noqa: TRY004
f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}.")
    return data


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"TrainConfig.{name}={value!r}: must be {allowed}.")


# ---- type coercion shared by YAML values and flags ----------------------------------------------------

def _field_type(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def _options(tp: Any) -> tuple[list[Any], bool]:
    """(member types, whether None is allowed) of a possibly-union annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = list(typing.get_args(tp))
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _coerce(value: Any, tp: Any) -> Any:
    members, nullable = _options(tp)
    if value is None or (nullable and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not nullable:
            raise ValueError("a value is required")
        return None
    errors = []
    for member in members:
        try:
            return _coerce_one(value, member)
        except (TypeError, ValueError) as err:
            errors.append(str(err))
    raise ValueError("; ".join(errors))


def _coerce_one(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError("expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        number = float(value) if isinstance(value, str) else value
        if tp is int and float(number) != int(number):
            raise ValueError(f"expected an integer, got {value!r}")
        return tp(number)
    if tp is str:
        if isinstance(value, (list, dict)):
            raise TypeError("expected a single value")
        return str(value)
    if origin is list:
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError("expected a list")
        return [str(v) for v in items]
    if origin is dict:
        return _parse_mapping(value)
    raise TypeError(f"unsupported field type {tp}")


def _parse_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    if text.startswith("{"):
        return dict(json.loads(text))
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise ValueError(f"expected JSON or key=value pairs, got {part!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw.strip()
    return out


# ---- command-line flags ---------------------------------------------------------------------------------

def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field; only flags the user gives end up in the parsed namespace (default SUPPRESS)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        members, _ = _options(_field_type(f.name))
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=argparse.SUPPRESS, help=help_text)
        elif members == [bool]:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def flags_from_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    keys = set(TrainConfig.allowed_keys())
    return {k: v for k, v in vars(ns).items() if k in keys}
