"""Benchmarks of the whole pipeline (the performance ratios P1-P8 in the README). Imports both stages; nothing imports it."""
