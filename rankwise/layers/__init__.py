"""Adapter layer math: rank-resizable LoRA, DoRA, scaling rules."""

from rankwise.layers.adapter import LoraAdapter, ParamRemap
from rankwise.layers.base_kinds import supported_types
from rankwise.layers.lora import LoraLayer
from rankwise.layers.scaling import alpha_from_scale, lora_scale

__all__ = ["LoraAdapter", "LoraLayer", "ParamRemap", "alpha_from_scale", "lora_scale", "supported_types"]
