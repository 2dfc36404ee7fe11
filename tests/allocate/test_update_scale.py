"""match_update (rankwise/allocate/update_scale.py): the scale follows budget / params, the function does not move,
Adam's next step in s * B is new / old times as large, SoRA ends at its injected scale, resume and export hold."""

import copy

import pytest
import torch
from allocate.checks import SETUPS, build, export_max_diff, one_thread, resume_matches

from rankwise.allocate.update_scale import rescale_adapters, update_factor
from rankwise.layers.adapter import LoraAdapter

BUDGET, STEPS, CONFIG = SETUPS["sora"]  # injected at rank 8 (2048 parameters), budget 1024
MATCH = {**CONFIG, "match_update": True}
PLAIN = {**CONFIG, "match_update": False}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_sora_matches_the_update_by_default():
    assert build("sora", BUDGET, STEPS, CONFIG).alloc.config.match_update


def test_factor_is_budget_over_params_above_the_budget_only():
    assert update_factor(2048, 1024) == 0.5
    assert update_factor(1024, 1024) == 1.0 and update_factor(512, 1024) == 1.0, "never raised above injected"


def _adapter_with_adam(bias: bool) -> tuple[LoraAdapter, torch.optim.Adam, torch.Tensor]:
    torch.manual_seed(0)
    a = LoraAdapter(12, 10, r=4, alpha=8.0, bias=bias)
    with torch.no_grad():
        a.lora_B.normal_()
        if bias:
            a.lora_bias.normal_()
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    x = torch.randn(6, 12)
    for _ in range(3):  # running moments that are not zero
        a.linear_delta(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return a, opt, x


@pytest.mark.parametrize("bias", [False, True])
def test_rescale_keeps_the_function_and_scales_the_next_adam_step(bias):
    a, opt, x = _adapter_with_adam(bias)
    b = copy.deepcopy(a)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = a.linear_delta(x).detach()
    rescale_adapters([b], old=0.5, new=0.75, optimizer=opt_b)
    assert b.scale == pytest.approx(a.scale * 1.5)
    torch.testing.assert_close(b.linear_delta(x).detach(), before, rtol=1e-6, atol=1e-6)
    steps = []
    for m, opt_m in ((a, opt), (b, opt_b)):
        sb = m.scale * m.lora_B.detach().clone()
        m.linear_delta(x).square().sum().backward()
        opt_m.step()
        steps.append(m.scale * m.lora_B.detach() - sb)
    torch.testing.assert_close(steps[1], 1.5 * steps[0], rtol=1e-4, atol=1e-7)


def test_sora_starts_at_budget_over_params_and_ends_at_its_injected_scale():
    plain = build("sora", BUDGET, STEPS, PLAIN)
    run = build("sora", BUDGET, STEPS, MATCH)
    s0 = {n: a.scale for n, a in plain.alloc.modules.items()}
    assert all(a.scale == pytest.approx(0.5 * s0[n]) for n, a in run.alloc.modules.items()), "2048 params, budget 1024"
    with torch.no_grad():
        torch.testing.assert_close(run.outputs(), plain.outputs())  # B is zero at the start: same function
    seen = []
    for step in range(1, STEPS + 1):
        run.train(step, step)
        params = run.alloc.current_params()
        seen.append(run.alloc.update_factor)
        assert run.alloc.update_factor == pytest.approx(min(1.0, 1024 / params))
        assert all(a.scale == pytest.approx(s0[n] * run.alloc.update_factor) for n, a in run.alloc.modules.items())
    assert seen == sorted(seen) and seen[0] < 0.6 and seen[-1] == 1.0, "the factor rises as SoRA prunes, to 1"
    run.alloc.finalize()
    assert all(a.scale == pytest.approx(s0[n]) for n, a in run.alloc.modules.items())


def test_a_resize_does_not_move_the_function():
    run = build("sora", BUDGET, STEPS, MATCH)
    run.train(1, 20)
    name = next(iter(run.alloc.modules))
    adapter = run.alloc.modules[name]
    with torch.no_grad():
        adapter.rank_vector[0] = 0.0  # a zero gate: removing it leaves the function as it is
    before, factor = run.outputs(), run.alloc.update_factor
    run.alloc.resize_module(name, list(range(1, adapter.r)), step=20)
    assert run.alloc.update_factor > factor
    torch.testing.assert_close(run.outputs(), before, rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly_with_matched_scales():
    same, _straight, saved = resume_matches("sora", k=60, config=MATCH)
    assert same and 0.5 < saved["update_factor"] < 1.0 and saved["update_scales"]


def test_export_with_matched_scales_loads_in_peft(tmp_path):
    run = build("sora", BUDGET, STEPS, MATCH)
    run.train(1, STEPS)
    run.alloc.finalize()
    assert export_max_diff(run, tmp_path / "adapter") <= 1e-5


def test_adalora_folds_the_rescale_into_its_singular_values():
    budget, steps, config = SETUPS["adalora"]
    run = build("adalora", budget, steps, {**config, "match_update": True})
    plain = build("adalora", budget, steps, config)
    run.train(1, steps)
    plain.train(1, 1)
    assert run.alloc.update_factor == 1.0 and run.alloc.current_params() <= run.alloc.budget_params
    s0 = {n: a.scale for n, a in plain.alloc.modules.items()}
    assert all(a.scale == pytest.approx(s0[n]) for n, a in run.alloc.modules.items())
    rescaled = build("adalora", budget, steps, {**config, "match_update": True})
    rescaled.train(1, 5)
    name, adapter = next(iter(rescaled.alloc.modules.items()))
    B, e = adapter.lora_B.detach().clone(), adapter.rank_vector.detach().clone()
    rescale_adapters([adapter], 1.0, 2.0, rescaled.opt, into="rank_vector")
    assert torch.equal(adapter.lora_B, B) and torch.allclose(adapter.rank_vector, e / 2)


def _lr_mode_run():
    from rankwise.optim_groups import loraplus_param_groups, param_group

    run = build("sora", BUDGET, STEPS, PLAIN)
    run.alloc.config.match_update, run.alloc.config.match_update_by = True, "lr"
    run.opt = torch.optim.Adam(loraplus_param_groups(run.model, 1e-2, ratio=1.0), lr=1e-2)
    run.alloc.attach(run.opt)
    return run, lambda name: param_group(run.opt, name)


def test_lr_mode_scales_the_adapter_learning_rate_not_the_adapter():
    run, group = _lr_mode_run()
    scales = {n: a.scale for n, a in run.alloc.modules.items()}
    assert run.alloc.update_factor == pytest.approx(0.5), "2048 params, budget 1024"
    assert group("lora_A")["lr"] == 1e-2, "applied before each step, not at attach"
    run.train(1, 1)
    for name in ("lora_A", "lora_B", "lora_B_no_decay"):
        assert group(name)["lr"] == pytest.approx(0.5e-2), name
    assert group("other")["lr"] == 1e-2, "the rest of the model keeps its rate"
    assert {n: a.scale for n, a in run.alloc.modules.items()} == scales, "no fold: scales stay as injected"
    run.train(2, 2)  # no scheduler: the stored base is reused, the factor does not compound
    assert group("lora_A")["lr"] == pytest.approx(1e-2 * run.alloc.update_factor)
    group("lora_A")["lr"] = 4e-2  # a scheduler (or the user) sets a new base
    run.train(3, 3)
    assert group("lora_A")["lr"] == pytest.approx(4e-2 * run.alloc.update_factor)
    run.train(4, STEPS)
    assert run.alloc.update_factor == 1.0 and group("lora_B")["lr"] == pytest.approx(1e-2), "at the budget: lr as set"


def test_lr_mode_needs_named_groups_and_a_known_mode():
    with pytest.raises(ValueError, match="loraplus_param_groups"):
        build("sora", BUDGET, STEPS, {**MATCH, "match_update_by": "lr"})  # checks.Run's plain Adam has no names
    with pytest.raises(ValueError, match="match_update_by='learning_rate'"):
        build("sora", BUDGET, STEPS, {**MATCH, "match_update_by": "learning_rate"})
