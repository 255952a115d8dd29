"""Offline two-stage knowledge distillation: shared core (config, cache format, device policy, CLI)."""

__version__ = "0.1.0"
