"""Seed 001's registries: `@MODELS.register_module()`, `@DATASETS.register_module()` and
`@LOSSES.register_module()` register a class under its own name (or register_module(name=...)).

MODELS holds the suite's models too (--model_type), and LOSSES its losses (--loss); DATASETS holds only the
datasets registered this way (the built-in ones are chosen with --dataset).
"""
from data.components import DATASETS
from models.losses import LOSSES
from models.registry import MODELS

__all__ = ["MODELS", "DATASETS", "LOSSES"]
