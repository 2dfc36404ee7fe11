"""Adapter initialisers: a registry plus the weight- and data-driven methods."""

from rankwise.init.registry import available_initializers, get_initializer, register_initializer

__all__ = ["available_initializers", "get_initializer", "register_initializer"]
