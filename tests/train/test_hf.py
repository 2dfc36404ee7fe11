"""RankwiseCallback inside a real transformers.Trainer run: ranks shrink physically, the optimizer follows,
the regulariser reaches the gradients, and a Trainer checkpoint resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert
from transformers import Trainer, TrainingArguments

import rankwise
from rankwise.allocate import Budget, available_allocators
from rankwise.train.hf import STATE_FILE, RankwiseCallback

pytestmark = pytest.mark.skipif("adalora" not in available_allocators(), reason="needs the adalora allocator")

STEPS = 12


def dataset(n: int = 96, seed: int = 0) -> list[dict]:
    """Fixed-length token rows; the label is whether token 7 occurs (learnable by a tiny BERT)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 30, (n, 12), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": int((row == 7).any())} for row in ids]


def make(seed: int = 0):
    model = tiny_bert(seed=seed)
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, modules_to_save=["classifier"]))
    return model


def trainer_for(model, callback, out, **kw) -> Trainer:
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=5e-3,
                             save_strategy="steps", save_steps=6, logging_steps=100, report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, dataloader_num_workers=0, **kw)
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainer_runs_adalora_without_user_calls(tmp_path):
    model = make()
    callback = RankwiseCallback(model, "adalora", Budget(avg_rank=2), total_steps=STEPS, config={"interval": 2})
    calls = {"loss_term": 0}
    original = callback.allocator.loss_term

    def counted():
        calls["loss_term"] += 1
        return original()

    callback.allocator.loss_term = counted
    trainer = trainer_for(model, callback, tmp_path / "run")
    trainer.train()
    alloc = callback.allocator
    assert calls["loss_term"] == STEPS  # the orthogonality term was computed every step
    assert alloc.history and all(h["new_rank"] < h["old_rank"] for h in alloc.history)
    assert alloc.current_params() <= alloc.budget_params
    ranks = rankwise.rank_map(model)
    assert min(ranks.values()) < 4  # physically smaller
    # The Trainer's optimizer holds exactly the model's current parameters, with state of matching shapes.
    opt = trainer.optimizer.optimizer
    held = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in held} == {id(p) for p in trainable}
    for p in held:
        assert opt.state[p]["exp_avg"].shape == p.shape
    out = callback.save_adapter(tmp_path / "adapter", task_type="SEQ_CLS")
    assert (out / "rank_history.jsonl").read_text().count("\n") == len(alloc.history)
    assert (tmp_path / "run" / "checkpoint-6" / STATE_FILE).is_file()


def test_regulariser_gradient_reaches_parameters(tmp_path):
    """With gamma > 0 the lora_A gradients differ from gamma = 0 at the first step (same data, same seed)."""
    grads = {}
    for gamma in (0.0, 0.5):
        model = make()
        callback = RankwiseCallback(model, "adalora", Budget(avg_rank=2), total_steps=STEPS, config={"gamma": gamma})
        seen = []
        callback.allocator.on_backward = lambda step, m=model, s=seen: s.append(
            next(p.grad.clone() for n, p in m.named_parameters() if n.endswith("lora_A")))
        trainer_for(model, callback, tmp_path / f"g{gamma}", max_grad_norm=0.0).train()
        grads[gamma] = seen[0]
    assert not torch.allclose(grads[0.0], grads[0.5])


def test_trainer_checkpoint_resumes_to_the_same_weights(tmp_path):
    full_model = make()
    full = RankwiseCallback(full_model, "adalora", Budget(avg_rank=2), total_steps=None, config={"interval": 2})
    trainer_for(full_model, full, tmp_path / "full").train()
    full.save_adapter(tmp_path / "full-adapter")
    assert any(h["step"] > 6 for h in full.allocator.history)  # ranks change after the resume point

    model = make()
    resumed = RankwiseCallback(model, "adalora", Budget(avg_rank=2), total_steps=None, config={"interval": 2})
    checkpoint = tmp_path / "full" / "checkpoint-6"
    resumed.prepare_resume(checkpoint)
    trainer_for(model, resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    resumed.save_adapter(tmp_path / "resumed-adapter")

    a = load_file(str(tmp_path / "full-adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed-adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert resumed.allocator.history == full.allocator.history


def test_prepare_resume_explains_a_foreign_folder(tmp_path):
    model = make()
    callback = RankwiseCallback(model, "fixed", "r2", total_steps=STEPS)
    with pytest.raises(FileNotFoundError, match="RankwiseCallback"):
        callback.prepare_resume(tmp_path)


def test_realign_gives_each_state_to_its_parameter():
    from rankwise.train.hf import realign_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    names = [n for n, _ in model.named_parameters()]
    saved = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    saved.step()
    # A new optimizer whose group lists the parameters in another order loads the state by position ...
    params = dict(model.named_parameters())
    shuffled = [names[2], names[0], names[3], names[1]]
    opt = torch.optim.Adam([params[n] for n in shuffled])
    opt.load_state_dict(saved.state_dict())
    assert opt.state[params[names[2]]]["exp_avg"].shape != params[names[2]].shape
    # ... and realign gives every state back to the parameter it belongs to.
    realign_optimizer(opt, [names], model)
    for n in names:
        assert torch.equal(opt.state[params[n]]["exp_avg"], saved.state[params[n]]["exp_avg"])


def test_sync_puts_new_parameters_next_to_their_adapter():
    from rankwise.train.hf import sync_optimizer

    model = make()
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if p.requires_grad
                                         and not n.endswith("bias")]},
                             {"params": [p for n, p in model.named_parameters() if p.requires_grad
                                         and n.endswith("bias")], "weight_decay": 0.0}])
    before = dict(model.named_parameters())
    for _, _, adapter in rankwise.adapter_modules(model):
        adapter.enable_rank_vector(0.0)
    sync_optimizer(opt, before, model)
    order = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    named = dict(model.named_parameters())
    assert opt.param_groups[0]["params"] == [named[n] for n in order]
