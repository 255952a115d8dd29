"""TOML reading on every Python the project supports (``requires-python >= 3.10``): the standard
library's ``tomllib`` from 3.11, the ``tomli`` package it was taken from (same API; a dependency
for Python < 3.11 in pyproject.toml) before. Import ``tomllib`` from here, never directly."""

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["tomllib"]
