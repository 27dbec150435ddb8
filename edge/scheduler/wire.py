"""A small DNS wire pre-parser for the answer cache's hit path: header, question, OPT, ECS.

Only the shape nearly every query has is read here (RFC 1035 section 4.1,
RFC 6891 section 6.1, RFC 7871 section 6): one question whose name is
plain labels, nothing in the answer and authority sections, and at most
one OPT record carrying only a client subnet and a cookie.  Anything else
(several questions, compression pointers, EDNS versions or flags we do not
know, other options, trailing bytes, an ECS with padding bits set) gives
None, and the full dnspython path answers it, FORMERR included.

So the pre-parser accepts a subset of what dnspython accepts: a packet it
reads is one dnspython would read the same way (the tests check both on
the same seeded mutations).  Pure: bytes in, a view out.
"""

from __future__ import annotations

from typing import NamedTuple

HEADER = 12
RD, AD, CD = 0x0100, 0x0020, 0x0010
QR, TC = 0x8000, 0x0200
# Query flags the hit path accepts; RD is echoed and CD/AD are not, but QR, an
# opcode, AA, TC, Z or an RCODE in a query is unusual enough for the full path.
_PLAIN_FLAGS = RD | AD | CD
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"       # QDCOUNT 1, ANCOUNT 0, NSCOUNT 0
_OPT_HEAD = b"\x00\x00\x29"                      # root owner, TYPE 41 (OPT)
_DO = 0x8000
OPTION_ECS, OPTION_COOKIE = 8, 10
_ECS_BITS = {1: 32, 2: 128}                      # family -> address bits
MAX_NAME = 255                                   # RFC 1035 section 3.1, in wire bytes


class QueryView(NamedTuple):
    """What the answer cache needs from a query, read without dnspython."""

    qkey: bytes           # lower-cased name, then qtype and qclass as sent: the question up to case
    question_end: int     # offset just past the question (the answer section of a response starts here)
    qtype: int
    flags: int            # the header's flags word
    edns: bool            # an OPT record was present
    payload: int          # its UDP payload size (0 without EDNS)
    do: bool              # DNSSEC OK (RFC 3225)
    ecs_family: int       # 1 (IPv4) or 2 (IPv6) with a client subnet option, else 0
    ecs_srclen: int       # its source prefix length
    ecs_address: bytes    # its address bytes, exactly as sent (ceil(srclen / 8) of them)


# QueryView(...) goes through a Python-level __new__; building the tuple directly
# costs a fifth of that, and this runs once per query.
_view = tuple.__new__


def parse_query(wire: bytes) -> QueryView | None:
    """The view of a plain query, or None for anything the full path must look at."""
    size = len(wire)
    if size < HEADER + 5:
        return None
    flags = wire[2] << 8 | wire[3]
    if flags & ~_PLAIN_FLAGS or not wire.startswith(_ONE_QUESTION, 4):
        return None
    arcount = wire[10] << 8 | wire[11]
    if arcount > 1:
        return None
    at = HEADER
    try:
        length = wire[at]
        while length:                             # labels up to the root; a pointer or a long label ends it
            if length > 63:
                return None
            at += length + 1
            length = wire[at]
    except IndexError:                            # the name runs past the packet
        return None
    name_end = at + 1
    if name_end - HEADER > MAX_NAME:
        return None
    question_end = name_end + 4
    if question_end > size:
        return None
    # bytes.lower() touches only A-Z; label lengths (< 64) are never in that range,
    # but qtype and qclass could be, so they are appended as sent.
    qkey = wire[HEADER:name_end].lower() + wire[name_end:question_end]
    qtype = wire[name_end] << 8 | wire[name_end + 1]
    if arcount == 0:
        if question_end != size:
            return None
        return _view(QueryView, (qkey, question_end, qtype, flags, False, 0, False, 0, 0, b""))
    return _with_opt(wire, qkey, question_end, qtype, flags)


def _with_opt(wire: bytes, qkey: bytes, question_end: int, qtype: int, flags: int) -> QueryView | None:
    at = question_end
    if wire[at:at + 3] != _OPT_HEAD or at + 11 > len(wire):
        return None
    payload = wire[at + 3] << 8 | wire[at + 4]
    extended_rcode, version = wire[at + 5], wire[at + 6]
    edns_flags = wire[at + 7] << 8 | wire[at + 8]
    rdlen = wire[at + 9] << 8 | wire[at + 10]
    at += 11
    end = at + rdlen
    if extended_rcode or version or edns_flags & ~_DO or end != len(wire):
        return None                               # BADVERS, Z bits, or bytes after the OPT record
    family = srclen = 0
    address = b""
    seen_ecs = seen_cookie = False
    while at < end:
        if at + 4 > end:
            return None
        code = wire[at] << 8 | wire[at + 1]
        length = wire[at + 2] << 8 | wire[at + 3]
        body = at + 4
        at = body + length
        if at > end:
            return None
        if code == OPTION_ECS and not seen_ecs:
            seen_ecs = True
            if length < 4:
                return None
            family = wire[body] << 8 | wire[body + 1]
            srclen, scope = wire[body + 2], wire[body + 3]
            bits = _ECS_BITS.get(family)
            # RFC 7871 section 6: scope 0 in queries, the prefix within the family,
            # exactly the bytes the prefix needs, and zero padding bits.
            if bits is None or srclen > bits or scope or length != 4 + (srclen + 7) // 8:
                return None
            address = wire[body + 4:at]
            if srclen % 8 and address[-1] & (0xFF >> (srclen % 8)):
                return None
        elif code == OPTION_COOKIE and not seen_cookie:
            seen_cookie = True                    # not echoed (no server cookies); only checked
            if length != 8 and not 16 <= length <= 40:
                return None
        else:
            return None                           # another option, or one twice
    return _view(QueryView, (qkey, question_end, qtype, flags, True, payload, bool(edns_flags & _DO),
                             family, srclen, address))


def ecs_value(family: int, address: bytes) -> int:
    """The client subnet's address as an integer of its family's width."""
    width = 4 if family == 1 else 16
    return int.from_bytes(address, "big") << (8 * (width - len(address)))


def truncated_reply(wire: bytes, view: QueryView) -> bytes:
    """An empty answer with TC set (RRL's slip): the client is asked to come back over TCP.

    Header (ID, QR, TC, the query's RD; opcode QUERY, NOERROR) and the
    question as sent, nothing else: smaller than the query, so a slipped
    answer amplifies nothing (RFC 7766 section 5, Knot's and NSD's RRL).
    """
    flags = QR | TC | (view.flags & RD)
    return wire[:2] + flags.to_bytes(2, "big") + _ONE_QUESTION + b"\x00\x00" + wire[HEADER:view.question_end]
