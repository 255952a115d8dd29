"""Benchmarks of the whole pipeline (P1-P6 of DESIGN.md). Imports both stages; nothing imports it."""
