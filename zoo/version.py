"""zoo's version (one place; the converted-weight cache is keyed by it)."""

__version__ = "0.1.0"
