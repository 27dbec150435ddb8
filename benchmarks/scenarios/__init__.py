"""One module per measured scenario: each has ``measure(...)`` and ``table(...)``."""
