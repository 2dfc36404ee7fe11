"""One benchmark row = one method trained on one task at one budget and seed, then evaluated.

Methods:
    <allocator>    rankwise with `make_allocator(<allocator>, ...)` (every name in available_allocators(),
                   "fixed" included), set up as `rankwise train` does by default (rankwise/train/runner.py):
                   injected at the budget's rank k (fixed) or at r0 = ceil(1.5 k) (adaptive), alpha = 2 r0
                   (scale s = 2 everywhere), default allocator options, `prepare` on 8 calibration batches.
    peft-lora      peft.LoraConfig(r=k, lora_alpha=2k): PEFT's plain LoRA at the rank the budget pays for.
    <m>@scale=X    a rankwise method with alpha = X r0 (scale X instead of 2): controls for the effective learning
                   rate of the update, which grows with the injected rank at a fixed scale (adaptive methods
                   start at 1.5x the rank), e.g. adalora@scale=1.333 (alpha = 2 k, the budget's rank) or
                   fixed@scale=3 (fixed rank with adaptive's 1.5x).
    fixed@profile=M  static ranks, never changed, shaped as allocator M left them at the end of its seed-0 run on
                   the same task and budget (mean rank per module kind, from PROFILE_SOURCE), rounded to integers
                   within the budget; alpha = 2 r per module (scale 2). Separates the allocation from the dynamics:
                   if this row beats fixed, the shape M found has value; if M's own row does not, the way M gets
                   there costs more than the shape gives.
    <m>@<option>=<value>  a rankwise allocator with one of its config's options set (value read as JSON), e.g.
                   sora@match_update=true; several variants chain: sora@match_update=true@final_steps=120.
    peft-adalora   peft.AdaLoraConfig(init_r=r0, target_r=k, lora_alpha=2 r0, so s = alpha / init_r = 2 as for
                   the others, not PEFT's default 8 / 12), t_init 10%, t_final 20%, deltaT 10 (rankwise
                   AdaLoRA's defaults), orth_reg_weight PEFT's default 0.5; `update_and_allocate(step)` is called
                   by hand after each optimizer step, before zero_grad, as PEFT requires.

What every row shares (for one task and seed): the base weights, the classifier head's initial values
(trained in full: modules_to_save), the batches in the same order, AdamW at the same learning rate with the
CLI's linear warmup / linear decay schedule, gradient clipping at 1.0, the number of steps.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from typing import Any

import torch
from torch import nn

from bench.quality_tasks import MINILM_TARGETS, SMOLLM_TARGETS, Task, batch_plan, collate, evaluate, selection_loss
from rankwise.optim_groups import loraplus_param_groups

PEFT_METHODS = ("peft-lora", "peft-adalora")
CALIBRATION_BATCHES = 8  # as rankwise.train.runner


PROFILE_SOURCE = "bench/results/quality_2026-11-22c/h100_lm_all_merged.jsonl"  # fixed@profile=M reads M's rows here


def _variants(method: str) -> tuple[str, dict[str, str]]:
    """"sora@scale=2@match_update=true" -> ("sora", {"scale": "2", "match_update": "true"})."""
    name, *parts = method.split("@")
    variants = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not key or not eq or not value or key in variants:
            raise ValueError(f"method {method!r}: {VARIANT_HELP}")
        variants[key] = value
    return name, variants


VARIANT_HELP = ("the variants are <rankwise method>@scale=X with X > 0 (e.g. adalora@scale=1.333), "
                "fixed@profile=<adaptive allocator> (e.g. fixed@profile=sora) and <allocator>@<option>=<value> for "
                "an option of the allocator's config (e.g. sora@match_update=true, sora@final_steps=120).")


def split_variant(method: str) -> tuple[str, float]:
    """"adalora@scale=1.333" -> ("adalora", 1.333); a plain name, fixed@profile=M or a method with options only ->
    (name, 2.0), the CLI's scale. Refuses what is not a variant (checks option names against the allocator's
    config, so a misspelt option stops the run before any row)."""
    name, variants = _variants(method)
    if name in PEFT_METHODS and variants:
        raise ValueError(f"method {method!r}: {VARIANT_HELP}")
    scale = 2.0
    if "scale" in variants:
        try:
            scale = float(variants["scale"])
        except ValueError:
            scale = -1.0
        if scale <= 0:
            raise ValueError(f"method {method!r}: {VARIANT_HELP}")
    if "profile" in variants:
        value = variants["profile"]
        if name != "fixed" or value in PEFT_METHODS or value == "fixed" or len(variants) > 1:
            raise ValueError(f"method {method!r}: {VARIANT_HELP}")
    variant_options(method)
    return name, scale


def variant_options(method: str) -> dict[str, Any]:
    """"sora@match_update=true@final_steps=120" -> {"match_update": True, "final_steps": 120}: the allocator
    options a variant sets (values read as JSON, else kept as strings), checked against the allocator's config."""
    import json

    from rankwise.allocate import get_allocator_class

    name, variants = _variants(method)
    options = {}
    for key, value in variants.items():
        if key in ("scale", "profile"):
            continue
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if options:
        try:
            get_allocator_class(name).Config.from_dict(options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"method {method!r}: {err} ({VARIANT_HELP})") from None
    return options


def profile_of(method: str) -> str | None:
    """"fixed@profile=sora" -> "sora"; None for every other method."""
    name, variants = _variants(method)
    return variants.get("profile") if name == "fixed" else None


def recorded_profile(allocator: str, task: str, budget: int, source: str = PROFILE_SOURCE) -> dict[str, float]:
    """Mean rank per module kind that `allocator` ended with in its seed-0 row of `task` at `budget` in `source`."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / source
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if (row.get("method"), row.get("task"), row.get("budget"), row.get("seed")) == (allocator, task, budget, 0) \
                    and row.get("ranks"):
                return row["ranks"]
    raise ValueError(f"fixed@profile={allocator}: no seed-0 row of {allocator} on {task} at budget r{budget} with "
                     f"recorded ranks in {source}; run that row first (bench/quality.py writes `ranks`) and point "
                     "PROFILE_SOURCE at its file.")


def static_ranks(profile: dict[str, float], costs: dict[str, int], budget_params: int) -> dict[str, int]:
    """Integer rank per module kind near `profile` whose parameters fit the budget: costs[kind] = sum of in + out
    over that kind's modules. Rounds down, then adds one rank at a time to the kinds with the largest remainder
    that still fit."""
    ranks = {kind: int(profile.get(kind, 0.0)) for kind in costs}
    left = budget_params - sum(ranks[k] * costs[k] for k in costs)
    if left < 0:
        raise ValueError(f"profile {profile} needs {budget_params - left} parameters, over the budget {budget_params}.")
    for kind in sorted(costs, key=lambda k: profile.get(k, 0.0) - ranks[k], reverse=True):
        if costs[kind] <= left and profile.get(kind, 0.0) > ranks[kind]:
            ranks[kind] += 1
            left -= costs[kind]
    return ranks


def init_rank(method: str, k: int) -> int:
    """The rank adapters are injected at: the CLI's default (runner.py), 1.5x the budget's rank if adaptive."""
    return k if split_variant(method)[0] in ("fixed", "peft-lora") else max(1, math.ceil(1.5 * k))


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    from rankwise.train.runner import lr_lambda

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("linear", int(warmup_ratio * steps), steps))


def adalora_schedule(steps: int) -> dict[str, int]:
    """PEFT's t_init / t_final / deltaT set to rankwise AdaLoRA's defaults (10%, 20%, every 10 steps)."""
    return {"tinit": round(0.1 * steps), "tfinal": round(0.2 * steps), "deltaT": 10}


class PeftAdaLoraHook:
    """Duck-types the allocator hooks of `rankwise.train.loop.train_step` for PEFT's AdaLoRA."""

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model

    def loss_term(self) -> None:
        return None  # PEFT adds its orthogonality term to outputs.loss inside forward

    def on_backward(self, step: int) -> None:
        pass

    def on_step(self, step: int) -> None:  # after optimizer.step, before zero_grad: gradients still there
        self.peft_model.base_model.update_and_allocate(step)

    def finalize(self) -> None:
        pass


# ---- parameter accounting ------------------------------------------------------------------------------

def peft_lora_params(model: nn.Module) -> int:
    """sum_i r_i * (in_i + out_i) of PEFT LoRA / AdaLoRA modules; for AdaLoRA only triplets whose
    singular value is not masked to zero count (PEFT keeps the masked ones in memory all run long)."""
    total = 0
    for module in model.modules():
        A = getattr(module, "lora_A", None)
        B = getattr(module, "lora_B", None)
        if not isinstance(A, nn.ModuleDict | nn.ParameterDict) or "default" not in A:
            continue
        a, b = A["default"], B["default"]
        a_w = a.weight if isinstance(a, nn.Module) else a  # LoRA: Linear (r, in); AdaLoRA: Parameter (r, in)
        b_w = b.weight if isinstance(b, nn.Module) else b  # (out, r)
        r = a_w.shape[0]
        E = getattr(module, "lora_E", None)
        if E is not None and "default" in E:
            r = int((E["default"] != 0).sum())
        total += r * (a_w.shape[1] + b_w.shape[0])
    return total


def peft_allocated_params(model: nn.Module) -> int:
    """Parameters PEFT holds in memory for the adapters (AdaLoRA: all init_r triplets)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


def module_costs(model: nn.Module, targets: str) -> dict[str, int]:
    """{module name: in + out} of the modules every method targets (the budget's unit of account)."""
    import re

    return {n: m.in_features + m.out_features for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and re.fullmatch(targets, n)}


def rank_profile(model: nn.Module) -> dict[str, float]:
    """Mean rank by module kind (the name after the layer index, e.g. 'attention.self.query', 'mlp.down_proj')."""
    import re

    import rankwise

    groups: dict[str, list[int]] = {}
    for name, r in rankwise.rank_map(model).items():
        groups.setdefault(re.sub(r"^.*?\.\d+\.", "", name), []).append(r)
    return {k: sum(v) / len(v) for k, v in groups.items()}


# ---- set-up of each method -------------------------------------------------------------------------------

def setup_rankwise(method: str, model: nn.Module, task: Task, k: int, budget_params: int, steps: int, seed: int,
                   batches, loss_fn, heldout_batch, modules_to_save, allocator_options: dict[str, Any]):
    import rankwise
    from rankwise.allocate import Budget, make_allocator

    targets = MINILM_TARGETS if task.kind == "cls" else SMOLLM_TARGETS
    r0 = init_rank(method, k)
    profile = profile_of(method)
    if profile is not None:  # static ranks in the shape `profile` found; no allocator
        import re

        kinds: dict[str, int] = {}
        for name, cost in module_costs(model, targets).items():
            kind = re.sub(r"^.*?\.\d+\.", "", name)
            kinds[kind] = kinds.get(kind, 0) + cost
        ranks = static_ranks(recorded_profile(profile, task.name, k), kinds, budget_params)
        rankwise.inject(model, rankwise.LoraConfig(
            r=k, alpha=2.0 * k, target_modules=targets, modules_to_save=modules_to_save,
            rank_pattern={kind: r for kind, r in ranks.items()},
            alpha_pattern={kind: 2.0 * max(r, 1) for kind, r in ranks.items()}))
        return None, lambda: rankwise.adapter_param_count(model)
    options = {**allocator_options.get(split_variant(method)[0], {}), **variant_options(method)}
    method, scale = split_variant(method)
    rankwise.inject(model, rankwise.LoraConfig(r=r0, alpha=scale * r0, target_modules=targets,
                                               modules_to_save=modules_to_save))
    alloc = make_allocator(method, model, Budget(params=budget_params), options, total_steps=steps, seed=seed)
    alloc.prepare(batches, loss_fn)
    alloc.set_eval_batch(heldout_batch, loss_fn)  # held-out TRAINING rows, never the dev set we report
    return alloc, lambda: rankwise.adapter_param_count(model)


def setup_peft(method: str, model: nn.Module, task: Task, k: int, steps: int):
    import peft

    targets = MINILM_TARGETS if task.kind == "cls" else SMOLLM_TARGETS
    task_type = "SEQ_CLS" if task.kind == "cls" else "CAUSAL_LM"
    if method == "peft-lora":
        cfg = peft.LoraConfig(task_type=task_type, r=k, lora_alpha=2 * k, target_modules=targets, lora_dropout=0.0)
        model = peft.get_peft_model(model, cfg)
        return model, None, lambda: peft_lora_params(model)
    r0 = init_rank(method, k)
    cfg = peft.AdaLoraConfig(task_type=task_type, init_r=r0, target_r=k, lora_alpha=2 * r0, lora_dropout=0.0,
                             target_modules=targets, total_step=steps, **adalora_schedule(steps))
    model = peft.get_peft_model(model, cfg)
    return model, PeftAdaLoraHook(model), lambda: peft_lora_params(model)


# ---- one row ---------------------------------------------------------------------------------------------

def run_row(job: dict[str, Any], base: nn.Module, task: Task, pad_id: int) -> dict[str, Any]:
    """Train `job["method"]` on `task` for job["steps"] steps and evaluate it. `base` is not modified."""
    from rankwise.train.loop import train_step

    device = torch.device(job["device"])
    seed, steps, bs, k, method = job["seed"], job["steps"], job["batch_size"], job["budget"], job["method"]
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(device)
    modules_to_save = None
    if task.kind == "cls":  # same head initialisation for every method of this seed
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
            model.classifier.bias.zero_()
        modules_to_save = ["classifier"]
    plan = batch_plan(len(task.train), steps, bs, seed)

    def calibration():  # what the CLI gives prepare(): 8 batches of a fixed sample, not the training order
        g = torch.Generator().manual_seed(seed + 7919)
        order = torch.randperm(len(task.train), generator=g)[:CALIBRATION_BATCHES * bs].tolist()
        return (collate([task.train[i] for i in order[j:j + bs]], pad_id, device) for j in range(0, len(order), bs))

    heldout = collate(task.heldout[:bs], pad_id, device)  # one batch, as the CLI gives set_eval_batch

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        return m(**batch).loss

    budget_params = k * sum(module_costs(model, MINILM_TARGETS if task.kind == "cls" else SMOLLM_TARGETS).values())
    _sync(device)
    t0 = time.perf_counter()
    if method in PEFT_METHODS:
        model, hook, count = setup_peft(method, model, task, k, steps)
        allocated = functools.partial(peft_allocated_params, model)
    else:
        hook, count = setup_rankwise(method, model, task, k, budget_params, steps, seed, calibration, loss_fn, heldout,
                                     modules_to_save, job.get("allocator_options", {}))
        allocated = count
    if method in PEFT_METHODS:
        params: list = [p for p in model.parameters() if p.requires_grad]
    else:  # the same update (one lr, no decay) in groups named as rankwise's (match_update_by="lr" needs them)
        params = loraplus_param_groups(model, job["lr"], ratio=1.0, weight_decay=0.0)
    optimizer = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0)
    scheduler = linear_schedule(optimizer, steps, job["warmup_ratio"])
    if hook is not None and hasattr(hook, "attach"):
        hook.attach(optimizer)
    _sync(device)
    t_setup = time.perf_counter() - t0
    losses, peak = [], allocated()
    for step, idx in enumerate(plan, start=1):
        batch = collate([task.train[i] for i in idx], pad_id, device)
        loss = train_step(model, batch, step, optimizer, allocator=hook, loss_fn=loss_fn, scheduler=scheduler,
                          grad_clip=1.0)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{method} on {task.name}: loss {loss} at step {step}")
        losses.append(loss)
        if step % 10 == 0 or step == steps:
            peak = max(peak, allocated())
    if hook is not None:
        hook.finalize()
    _sync(device)
    wall = time.perf_counter() - t0
    metrics = {"score": 0.0}
    if job.get("evaluate", True):
        metrics = evaluate(model, task, pad_id, device, job["eval_batch_size"])
        metrics["select_loss"] = selection_loss(model, task, pad_id, device, job["eval_batch_size"])
    tail = losses[-max(1, steps // 10):]
    result = {
        **{key: job[key] for key in ("task", "method", "budget", "seed", "steps", "batch_size", "lr")},
        "score": metrics["score"], "metrics": metrics, "params": count(), "params_peak": peak,
        "budget_params": budget_params, "wall_s": wall, "setup_s": t_setup, "train_loss_end": sum(tail) / len(tail),
        "device": str(device),
    }
    if method not in PEFT_METHODS:
        result["ranks"] = rank_profile(model)
        result["history_len"] = len(getattr(hook, "history", []))
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
