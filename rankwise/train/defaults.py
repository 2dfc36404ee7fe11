"""The defaults a user gets without choosing: one place, so a benchmark can change them in one line.

DEFAULT_ALLOCATOR: the rank allocator of `rankwise train` and `rankwise demo` when --method is not given.
SoRA, the adaptive allocator with the best mean in the quality benchmark (docs/BENCHMARKS.md, "Quality":
MiniLM on SST-2 / CoLA / RTE / MRPC at two budgets, 3 seeds): 54.86 against 55.07 for fixed rank (inside the
seed noise), 54.43 for PEFT's LoRA and 45.34 for PEFT's AdaLoRA. Since 2026-12-06 its scales follow
budget / params (`match_update`), and at that equal update size, on the GPU over 7 tasks x 2 budgets x 3 seeds, it
beat fixed rank on the three SmolLM2 tasks (5 of 6 cells) and tied it on GLUE (mean 62.57 against 62.72; docs/
BENCHMARKS.md, "GPU run 7"); with every path of the update matched (match_update_by="lr") it lost to fixed rank on
GSM8K (CPU, one seed), so that lead is not shown to be the allocation. Use method="fixed" for plain LoRA.
"""

DEFAULT_ALLOCATOR = "sora"
DEFAULT_BUDGET = "r8"
