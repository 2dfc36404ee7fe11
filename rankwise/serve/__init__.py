"""Serving many heterogeneous-rank LoRA adapters over one Llama-family base model.

    from rankwise.serve import Engine, EngineConfig, Request, SamplingParams
    engine = Engine.from_pretrained("path/to/model", EngineConfig(max_num_seqs=32), adapter_dir="adapters/")
    outs = engine.generate([Request(token_ids, adapter="name", params=SamplingParams(max_tokens=64))])

HTTP: `rankwise serve --model ... --adapters ...` (`rankwise.serve.cli`, `rankwise.serve.api`).
"""

from rankwise.serve.adapter_cache import AdapterError
from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.engine import Engine, QueueFullError, Request, RequestOutput

__all__ = ["AdapterError", "Engine", "EngineConfig", "QueueFullError", "Request", "RequestOutput", "SamplingParams"]
