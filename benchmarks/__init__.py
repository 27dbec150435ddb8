"""Benchmarks: this CDN measured side by side with nginx, Varnish, ATS and knotd.

Run ``python -m benchmarks`` (``--quick`` for a two-minute pass); see
``benchmarks/README.md`` for what is measured and how.
"""
