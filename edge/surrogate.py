"""Tags (surrogate keys) an origin attaches to a response, so one purge can name many objects.

Two response fields carry them, both accepted and merged:

* ``Surrogate-Key`` (Fastly, Varnish's xkey): space-separated,
  ``Surrogate-Key: product-42 category-7``;
* ``Cache-Tag`` (Cloudflare, Akamai's Edge-Cache-Tag): comma-separated,
  ``Cache-Tag: product-42,category-7``.

Tags are case-sensitive (as Fastly's keys).  They are stored with the
object, passed from an L2 to an L1 (so the L1 can store them too) and never
sent to clients.  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

TAG_FIELDS = ("Surrogate-Key", "Cache-Tag")
TAG_FIELD_NAMES = frozenset(name.lower() for name in TAG_FIELDS)
MAX_TAG_LENGTH = 1024        # Fastly's and Cloudflare's limit per key/tag
MAX_TAGS = 256               # per object: more are ignored (the purge index is in memory)


def valid_tag(tag: str) -> bool:
    """A tag is 1..1024 visible ASCII characters without a comma."""
    return 0 < len(tag) <= MAX_TAG_LENGTH and all("!" <= c <= "~" for c in tag) and "," not in tag


def parse_tags(fields: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The tags named by the tag fields among `fields` (name, value pairs), each once, in order.

    Members that are not valid tags (too long, control or non-ASCII bytes)
    are skipped, and at most :data:`MAX_TAGS` are kept.
    """
    tags: dict[str, None] = {}
    for name, value in fields:
        lowered = name.lower()
        if lowered not in TAG_FIELD_NAMES:
            continue
        members = value.split() if lowered == "surrogate-key" else value.split(",")
        for member in members:
            tag = member.strip()
            if valid_tag(tag):
                tags.setdefault(tag)
                if len(tags) == MAX_TAGS:
                    return tuple(tags)
    return tuple(tags)
