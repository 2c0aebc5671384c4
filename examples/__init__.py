"""Example models and scripts (a package so that ``examples.models:tiny_gpt`` imports from the repo root)."""
