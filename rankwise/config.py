"""Typed adapter configuration.

`LoraConfig` describes one named adapter: which modules it targets, their ranks and scales, and the
layer variant (rsLoRA scaling, DoRA, bias on B). It is validated when built; an impossible value is an
error naming the field, the value and what is allowed. `to_dict` / `from_dict` round-trip to JSON.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    dW = s * B @ A with A: (r, in), B: (out, r) and s = alpha / r, or alpha / sqrt(r) with `use_rslora`.

    target_modules: a list of module-name suffixes (``["q_proj", "v_proj"]``), one regex string that must
        match the full dotted name (``r".*\\.layers\\.[0-3]\\..*_proj"``), or ``"all-linear"`` (every
        linear layer except the output head / classifier).
    exclude_modules: the same forms; matched modules are never wrapped.
    rank_pattern / alpha_pattern: ``{regex: value}`` matched against the END of the module name, as PEFT
        does (``re.match(rf"(.*\\.)?({key})$", name)``); the first matching key wins.
    init: name of a registered initialiser (``rankwise.init.available_initializers()``).
    modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    bias: bool = False
    init: str = "default"
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.r, int) and self.r >= 0, f"LoraConfig.r={self.r!r}: must be an integer >= 0.")
        _check(self.alpha > 0, f"LoraConfig.alpha={self.alpha!r}: must be > 0 (try 2 * r).")
        _check(0.0 <= self.dropout < 1.0, f"LoraConfig.dropout={self.dropout!r}: must be in [0, 1).")
        _check(
            isinstance(self.target_modules, (str, list, tuple)) and len(self.target_modules) > 0,
            f"LoraConfig.target_modules={self.target_modules!r}: give a list of name suffixes, a regex "
            "string, or 'all-linear'.",
        )
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        for key, value in self.rank_pattern.items():
            _check(
                isinstance(value, int) and value >= 0,
                f"LoraConfig.rank_pattern[{key!r}]={value!r}: ranks must be integers >= 0.",
            )
            self._check_regex("rank_pattern", key)
        for key, value in self.alpha_pattern.items():
            _check(value > 0, f"LoraConfig.alpha_pattern[{key!r}]={value!r}: alphas must be > 0.")
            self._check_regex("alpha_pattern", key)
        if self.use_dora and self.bias:
            raise ValueError(
                "LoraConfig: use_dora=True with bias=True is not supported (PEFT refuses it too); "
                "set bias=False."
            )
        from rankwise.init.registry import get_initializer

        get_initializer(self.init)  # raises with the list of registered names

    @staticmethod
    def _check_regex(field_name: str, key: str) -> None:
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"LoraConfig.{field_name} key {key!r} is not a valid regex: {err}.") from err

    def rank_for(self, name: str) -> int:
        """Rank of the module called `name` (rank_pattern first, then r)."""
        return int(match_pattern(self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        return float(match_pattern(self.alpha_pattern, name, self.alpha))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"LoraConfig: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}.")
        return cls(**data)


def match_pattern(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern rule: the first key whose regex matches the end of `name` (at a dot boundary)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
