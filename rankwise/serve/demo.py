"""Write a tiny random Llama model, its tokenizer and a few adapters of different ranks, for trying the server.

    python -m rankwise.serve.demo demo-serve        # -> demo-serve/model, demo-serve/adapters/{r4,mixed,dora}

Everything is made locally (no downloads) and is small enough to serve on a CPU. The adapters are written with
`rankwise.save_adapter` in the PEFT format: `r4` (rank 4 on q, v), `mixed` (ranks 2..8 on all 7 projections via
rank_pattern), `dora` (DoRA, rank 4 on q, k, v, o).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ADAPTERS = {
    "r4": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "mixed": dict(r=4, alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 8, "down_proj": 2, "k_proj": 6}),
    "dora": dict(r=4, alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True),
}


def tiny_llama_config(vocab_size: int = 258):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)


def write_demo(out: str | Path, seed: int = 0) -> Path:
    """Create `out/model` and `out/adapters/<name>`; returns `out`."""
    from transformers import LlamaForCausalLM

    import rankwise
    from rankwise.serve.tokenizer import byte_level_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(out / "model")
    byte_level_tokenizer().save_pretrained(out / "model")
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        m = LlamaForCausalLM.from_pretrained(out / "model")
        rankwise.inject(m, rankwise.LoraConfig(**kw))
        g = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for _, layer in rankwise.lora_layers(m):
                for p in layer.adapters.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        rankwise.save_adapter(m, out / "adapters" / name, task_type="CAUSAL_LM")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to create")
    args = parser.parse_args(argv)
    out = write_demo(args.out)
    print(f"wrote {out / 'model'} and adapters {sorted(ADAPTERS)} under {out / 'adapters'}")


if __name__ == "__main__":
    main()
