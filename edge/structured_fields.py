"""RFC 8941 Structured Field Dictionaries: just what RFC 9213 targeted cache fields need.

Kept apart from `policy` because it is a parser, not a caching decision.
"""

from __future__ import annotations

from typing import Any

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class StructuredFieldError(ValueError):
    """The text is not a valid Structured Field of the kind asked for."""


_SF_KEY_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz*")
_SF_KEY_CHARS = _SF_KEY_FIRST | frozenset("0123456789_-.")
_SF_TOKEN_CHARS = _TCHAR | {":", "/"}
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_INVALID_VALUE = ""          # a byte sequence or inner list: no cache directive takes one


class _Parser:
    """The subset of RFC 8941 section 4.2 needed to read a Dictionary field.

    Members map to cache-directive values as RFC 9213 section 2.1 prescribes:
    Boolean true is a bare directive (None), false is absent, Integers,
    Decimals, Strings and Tokens become their text; parameters are ignored.
    """

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self) -> StructuredFieldError:
        return StructuredFieldError(f"invalid structured field at {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def dictionary(self) -> dict[str, Any]:
        """RFC 8941 section 4.2.2; duplicate keys: the last wins (section 3.2)."""
        members: dict[str, Any] = {}
        self.skip(" ")
        while self.pos < len(self.text):
            key = self.key()
            if self.peek() == "=":
                self.pos += 1
                value = self.item_or_inner_list()
            else:
                value = True
                self.parameters()
            members[key] = value
            self.skip(" \t")
            if self.pos == len(self.text):
                return members
            if self.peek() != ",":
                raise self.fail()
            self.pos += 1
            self.skip(" \t")
            if self.pos == len(self.text):
                raise self.fail()                   # trailing comma
        return members

    def key(self) -> str:
        if not self.peek() or self.peek() not in _SF_KEY_FIRST:
            raise self.fail()
        start = self.pos
        self.skip_set(_SF_KEY_CHARS)
        return self.text[start:self.pos]

    def skip_set(self, allowed: frozenset[str]) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in allowed:
            self.pos += 1

    def parameters(self) -> None:
        while self.peek() == ";":
            self.pos += 1
            self.skip(" ")
            self.key()
            if self.peek() == "=":
                self.pos += 1
                self.bare_item()

    def item_or_inner_list(self) -> Any:
        if self.peek() != "(":
            value = self.bare_item()
            self.parameters()
            return value
        self.pos += 1
        while True:
            self.skip(" ")
            if self.peek() == ")":
                self.pos += 1
                self.parameters()
                return _INVALID_VALUE
            self.bare_item()
            self.parameters()
            if self.peek() not in (" ", ")"):
                raise self.fail()

    def bare_item(self) -> Any:
        char = self.peek()
        if char == "-" or char.isdigit():
            return self.number()
        if char == '"':
            return self.string()
        if char == "*" or (char.isascii() and char.isalpha()):
            start = self.pos
            self.pos += 1
            self.skip_set(_SF_TOKEN_CHARS)
            return self.text[start:self.pos]
        if char == ":":
            end = self.text.find(":", self.pos + 1)
            if end < 0 or not set(self.text[self.pos + 1:end]) <= _BASE64_CHARS:
                raise self.fail()
            self.pos = end + 1
            return _INVALID_VALUE
        if char == "?":
            flag = self.text[self.pos + 1:self.pos + 2]
            if flag not in ("0", "1"):
                raise self.fail()
            self.pos += 2
            return flag == "1"
        raise self.fail()

    def number(self) -> str:
        """RFC 8941 section 4.2.4; returns the text (max-age=1.5 then reads as invalid)."""
        start = self.pos
        if self.peek() == "-":
            self.pos += 1
        digits_start = self.pos
        self.skip("0123456789")
        integer_digits = self.pos - digits_start
        if integer_digits == 0:
            raise self.fail()
        if self.peek() == ".":
            self.pos += 1
            fraction_start = self.pos
            self.skip("0123456789")
            if integer_digits > 12 or not 1 <= self.pos - fraction_start <= 3:
                raise self.fail()
        elif integer_digits > 15:
            raise self.fail()
        text = self.text[start:self.pos]
        return text if "." in text else str(int(text))

    def string(self) -> str:
        out: list[str] = []
        self.pos += 1
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\") or not escaped:
                    raise self.fail()
                out.append(escaped)
                self.pos += 1
            elif char == '"':
                return "".join(out)
            elif not " " <= char <= "~":
                raise self.fail()
            else:
                out.append(char)
        raise self.fail()


def parse_dictionary(text: str) -> dict[str, Any]:
    """Parse a Dictionary (RFC 8941 4.2.2); raises StructuredFieldError when invalid."""
    return _Parser(text).dictionary()
