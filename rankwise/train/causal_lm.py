"""Causal-LM tuning on instruction data, with the loss on the response tokens only.

Rows hold an instruction (or prompt / question), an optional input, and an output (or response / answer).
The prompt is the tokenizer's chat template (one user turn, generation prompt added) when it has one, else
the Alpaca layout. Labels are -100 on the prompt, so

    loss = mean over response tokens t of -log p(y_t | prompt, y_<t)

Evaluation: that loss and its perplexity on the eval file; with `eval_generate N`, greedy answers for the
first N eval rows and the exact match of their final number (GSM8K's '#### 42' convention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.train.data import read_table
from rankwise.train.metrics import exact_match, perplexity
from rankwise.train.models import load_model, load_tokenizer
from rankwise.train.tasks import Example, Task, register_task

INSTRUCTION_NAMES = ("instruction", "prompt", "question", "query")
INPUT_NAMES = ("input", "context")
OUTPUT_NAMES = ("output", "response", "answer", "completion")
ALPACA = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@register_task
class CausalLM(Task):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    primary_metric = "loss"
    higher_is_better = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.generation_items: list[tuple[list[int], str]] = []  # (prompt ids, reference answer)

    def prompt_text(self, instruction: str, extra: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            content = f"{instruction}\n\n{extra}" if extra else instruction
            return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
        block = f"### Input:\n{extra}\n\n" if extra else ""
        return ALPACA.format(instruction=instruction, input_block=block)

    def encode(self, instruction: str, extra: str, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids + eos), truncated to max_length keeping at least half for the response."""
        tok, limit = self.tokenizer, self.config.max_length
        chat = bool(getattr(tok, "chat_template", None))
        prompt = tok(self.prompt_text(instruction, extra), add_special_tokens=not chat)["input_ids"]
        answer = tok(response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            answer = answer + [tok.eos_token_id]
        room = max(limit - len(answer), limit // 2)
        prompt = prompt[-room:]  # drop the start of over-long prompts, keep the question's end
        return prompt, answer[: limit - len(prompt)]

    def read(self, path: str, limit: int | None, *, train: bool) -> list[Example]:
        cfg = self.config
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(cfg.model)
        wanted = tuple(c for c in (cfg.instruction_column, cfg.input_column, cfg.output_column) if c and not c.isdigit())
        table = read_table(path, cfg.format, cfg.header, header_names=wanted + INSTRUCTION_NAMES + OUTPUT_NAMES,
                           limit=limit)
        inst_key = table.resolve("instruction", cfg.instruction_column, INSTRUCTION_NAMES)
        input_key = table.resolve("input", cfg.input_column, INPUT_NAMES, required=False)
        out_key = table.resolve("output", cfg.output_column, OUTPUT_NAMES)
        examples: list[Example] = []
        items = []
        for row in table.rows:
            instruction = table.value(row, inst_key, role="instruction")
            extra = table.value(row, input_key, role="input", allow_empty=True) if input_key is not None else ""
            response = table.value(row, out_key, role="output")
            prompt, answer = self.encode(instruction, extra, response)
            ids = prompt + answer
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                             "labels": [-100] * len(prompt) + answer})
            items.append((prompt, response))
        if not train:
            self.generation_items = items
        return examples

    def load_model(self) -> nn.Module:
        model = load_model(self.config.model, "AutoModelForCausalLM")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "chat_template": bool(getattr(self.tokenizer, "chat_template", None))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example]) -> dict[str, float]:
        model.eval()
        total, tokens = 0.0, 0
        for batch in self.batches(examples, self.config.eval_batch_size):
            n = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
            if n:
                total += float(model(**batch).loss) * n
                tokens += n
        loss = total / max(tokens, 1)
        metrics = {"loss": loss, "perplexity": perplexity(loss)}
        if self.config.eval_generate:
            predictions, references = self.generate(model, self.generation_items[: self.config.eval_generate])
            metrics["exact_match"] = exact_match(predictions, references)
        return metrics

    @torch.no_grad()
    def generate(self, model: nn.Module, items: list[tuple[list[int], str]]) -> tuple[list[str], list[str]]:
        """Greedy answers for (prompt ids, reference) items, batched with left padding."""
        tok = self.tokenizer
        pad = tok.pad_token_id
        predictions: list[str] = []
        size = max(1, min(self.config.eval_batch_size, 8))
        for start in range(0, len(items), size):
            chunk = [p for p, _ in items[start:start + size]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # (batch, width)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.config.max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
            predictions += tok.batch_decode(out[:, width:], skip_special_tokens=True)
        return predictions, [ref for _, ref in items]
