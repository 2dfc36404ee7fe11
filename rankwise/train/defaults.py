"""The defaults a user gets without choosing: one place, so a benchmark can change them in one line.

DEFAULT_ALLOCATOR: the rank allocator of `rankwise train` and `rankwise demo` when --method is not given.
SoRA, the adaptive allocator with the best mean in the quality benchmark (docs/BENCHMARKS.md, "Quality":
MiniLM on SST-2 / CoLA / RTE / MRPC at two budgets, 3 seeds): 54.86 against 55.07 for fixed rank (inside the
seed noise), 54.43 for PEFT's LoRA and 45.34 for PEFT's AdaLoRA. Since 2026-12-06 its scales follow
budget / params (`match_update`), and at that equal update size it beat fixed rank on GSM8K (CPU, 2 seeds; docs/
BENCHMARKS.md, "Matched update size"). Use method="fixed" for plain LoRA.
"""

DEFAULT_ALLOCATOR = "sora"
DEFAULT_BUDGET = "r8"
