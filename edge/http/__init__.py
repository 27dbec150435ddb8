"""Our HTTP/1.1 front: one connection per protocol object, limits, drain, access log (see protocol.py)."""
