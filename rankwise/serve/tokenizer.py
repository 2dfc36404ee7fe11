"""Text <-> token ids for the server: the checkpoint's own tokenizer, and a byte-level one for demo models.

The engine works on token ids; the HTTP layer turns prompts and chat messages into ids with the tokenizer saved
beside the model (transformers' AutoTokenizer) and decodes outputs. `byte_level_tokenizer()` builds a real
transformers tokenizer with no downloads (256 byte tokens + <s> + </s>, a one-line chat template), which
`rankwise.serve.demo` saves beside its tiny random model.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in `path`, or None when the directory has none (then prompts must be token ids)."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def byte_level_tokenizer():
    """A 258-token byte-level BPE tokenizer with no merges: ids 0 = <s>, 1 = </s>, 2.. = bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = i + 2
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.chat_template = CHAT_TEMPLATE
    return out


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a completion prompt: ids pass through; text needs a tokenizer."""
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        raise ValueError("This model has no tokenizer; send the prompt as a list of token ids.")
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer is None:
        raise ValueError("This model has no tokenizer, so chat messages cannot be encoded; use /v1/completions "
                         "with token ids.")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The model's tokenizer has no chat template; use /v1/completions.")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
