"""HTTP request parsing that forwards extension methods and keeps the fast C parser.

aiohttp's C parser (llhttp) knows a fixed list of methods and answers 400 to
any other token, but a proxy must forward extension methods (RFC 9110 9.1),
as nginx and Varnish do.  aiohttp's pure-Python parser accepts any token but
costs about a third of the hit-path throughput.  So each connection starts
with the C parser and, the first time it rejects a method that is a valid
token, switches that connection to the Python parser and parses the same
bytes again.  The C parser raises before returning any message of the chunk,
so nothing is parsed twice.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import http_parser, web_protocol
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError

_FAST = getattr(http_parser, "HttpRequestParserC", None)
_TOLERANT = http_parser.HttpRequestParserPy
_TOKEN_THEN_SPACE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")


class ExtensionMethodParser:
    """Quacks like aiohttp's HttpRequestParser (feed_data and the rest)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args, self._kwargs = args, kwargs
        self._parser = (_FAST or _TOLERANT)(*args, **kwargs)
        self._can_switch = _FAST is not None

    def feed_data(self, data: bytes) -> Any:
        try:
            return self._parser.feed_data(data)
        except BadHttpMethod:
            if not (self._can_switch and _TOKEN_THEN_SPACE.match(data)):
                raise       # not an extension method (e.g. TLS on a plain port): 400 as before
            self._parser = _TOLERANT(*self._args, **self._kwargs)
            self._can_switch = False
            return self._parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class MalformedRequestLog(logging.Filter):
    """A malformed request is the client's mistake: one INFO line, not an ERROR with a traceback.

    The client already got its 400 from aiohttp; the operator needs to know
    who sent what, not the parser's stack.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = (error.message or "").strip().splitlines()
            record.msg = "malformed request (%s %s): %s"
            record.args = (error.code, type(error).__name__, reason[0] if reason else "")
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install() -> None:
    """Use this parser for every aiohttp server in the process (clients are untouched)."""
    web_protocol.HttpRequestParser = ExtensionMethodParser
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestLog) for f in server_log.filters):
        server_log.addFilter(MalformedRequestLog())
