"""edge: an L1/L2 caching CDN with a DNS scheduler."""

__version__ = "0.1.0"     # the package's version (pyproject.toml reads it from here)
