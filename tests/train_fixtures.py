"""Tiny local models (saved folders, as a user would pass them) and data files for the training and CLI tests.

Test modules use them with `from train_fixtures import *` (tests/conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import tiny_bert, tiny_llama

__all__ = ["cls_model_dir", "lm_model_dir", "math_files", "no_dropout_model_dir", "sentiment_rows", "sst_files", "word_tokenizer"]

POSITIVE = ["good", "great", "fun", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor"]
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "quite", "plot", "and"]
DIGITS = [str(i) for i in range(10)]
WORDS = POSITIVE + NEGATIVE + FILLER + DIGITS + ["what", "plus", "answer", "####", "user", "assistant"]


def word_tokenizer(chat: bool = False):
    """A WordLevel tokenizer over WORDS, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not chat:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", bos_token="<s>", eos_token="</s>")
    if chat:
        fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                              "{% if add_generation_prompt %}assistant {% endif %}")
    return fast


@pytest.fixture(scope="session")
def cls_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(seed=0).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def no_dropout_model_dir(tmp_path_factory) -> Path:
    """The tiny BERT without dropout: dropout masks depend on how a batch is split into micro-batches or
    processes, so runs that split it differently would differ."""
    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model = tiny_bert(seed=0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lm_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(seed=0)
    model.config.eos_token_id = 5
    model.config.bos_token_id = 4
    model.save_pretrained(path)
    word_tokenizer(chat=True).save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randrange(2, 6))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def sst_files(tmp_path_factory) -> tuple[Path, Path]:
    """(train.tsv, dev.tsv) with a `sentence<TAB>label` header, like GLUE SST-2."""
    path = tmp_path_factory.mktemp("sst")
    for name, n, seed in (("train.tsv", 96, 0), ("dev.tsv", 40, 1)):
        lines = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in sentiment_rows(n, seed)]
        (path / name).write_text("\n".join(lines) + "\n")
    return path / "train.tsv", path / "dev.tsv"


@pytest.fixture(scope="session")
def math_files(tmp_path_factory) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl) of GSM8K-shaped rows {question, answer} with '#### N' answers."""
    import json

    path = tmp_path_factory.mktemp("math")
    rng = random.Random(0)
    for name, n in (("train.jsonl", 48), ("test.jsonl", 8)):
        rows = []
        for _ in range(n):
            a, b = rng.randrange(5), rng.randrange(5)
            rows.append({"question": f"what is {a} plus {b}", "answer": f"{a} plus {b} #### {a + b}"})
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path / "train.jsonl", path / "test.jsonl"
