"""Shared fixtures for the serving tests: a tiny Llama and PEFT-written adapters of different ranks."""

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter (read when the kernels are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tiny_models import tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    """On a CPU of 2 shared cores, intra-op threads only contend on these tiny matrices (10-100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# name -> peft.LoraConfig keyword arguments; ranks differ across and within adapters.
ADAPTER_SPECS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all7": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
                 rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 3, "k_proj": 16},
                 alpha_pattern={"up_proj": 5}),
    "rs": dict(r=6, lora_alpha=4, target_modules=["o_proj", "gate_proj"], use_rslora=True,
               rank_pattern={"layers.1.mlp.gate_proj": 1}),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True),
}


def write_peft_adapters(root, specs=ADAPTER_SPECS, seed=0):
    peft = pytest.importorskip("peft")
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(tiny_llama(seed), peft.LoraConfig(init_lora_weights=False, **kw))
        with torch.no_grad():  # larger deltas than PEFT's random init, so that adapters change greedy outputs
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        pm.save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    return write_peft_adapters(tmp_path_factory.mktemp("adapters"))
