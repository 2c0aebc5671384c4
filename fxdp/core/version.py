"""The package version (one place; ``fxdp.__version__`` re-exports it)."""
VERSION = "0.1.0"
