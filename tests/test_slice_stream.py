"""A cold slice streams to its client as it arrives (edge.slicing.Filling): real L1 on
127.0.109.31, slice_size 64KiB, in front of an origin in this process (127.0.109.10) that
breaks its first slice bodies halfway.  The bytes before the break still reach a client whose
range lies there; a client past it sees the response cut; a broken slice is never stored."""

from __future__ import annotations

import http.client
import http.server
import re
import threading

import pytest

from tests.cluster import TRAFFIC_PORT, single_edge

IP = "127.0.109.31"
ORIGIN = ("127.0.109.10", TRAFFIC_PORT)
SLICE = 64 * 1024
BODY = bytes(i % 251 for i in range(SLICE))     # the object: one slice


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    broken = 2              # this many slice requests get half a body, then the connection closes
    asked = 0

    def do_GET(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if match is None:
            self.send_error(400)
            return
        first, last = int(match.group(1)), min(int(match.group(2)), len(BODY) - 1)
        Origin.asked += 1
        part = BODY[first:last + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(BODY)}")
        self.send_header("Content-Length", str(len(part)))
        self.send_header("ETag", '"v1"')
        self.send_header("Cache-Control", "max-age=300")
        self.end_headers()
        if Origin.broken > 0:
            Origin.broken -= 1
            self.wfile.write(part[:len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    server = http.server.ThreadingHTTPServer(ORIGIN, Origin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    node = None
    try:
        node = single_edge(tmp_path_factory.mktemp("slice-stream"), IP,
                           f'[sites.s]\nhosts = ["www.example.com"]\norigin = "http://{ORIGIN[0]}:{ORIGIN[1]}"\n'
                           'slice_size = "64KiB"\n')
        yield node
    finally:
        if node is not None:
            node.stop()
        server.shutdown()
        server.server_close()


def get(range_value: str | None):
    connection = http.client.HTTPConnection(IP, TRAFFIC_PORT, timeout=10)
    headers = {"Host": "www.example.com"}
    if range_value:
        headers["Range"] = range_value
    connection.request("GET", "/obj", headers=headers)
    response = connection.getresponse()
    try:
        return response.status, response.headers, response.read()
    except http.client.IncompleteRead as exc:
        return response.status, response.headers, exc
    finally:
        connection.close()


def test_a_cold_slice_streams_and_a_broken_one_is_cut_and_not_stored(edge):
    # The first 100 bytes arrive before the origin breaks off: the client has them all.
    status, _, body = get("bytes=0-99")
    assert status == 206 and body == BODY[:100] and Origin.asked == 1
    # A whole answer meets the break: cut short (never padded, never another version).
    status, _, body = get(None)
    assert status == 200 and isinstance(body, http.client.IncompleteRead)
    assert body.partial == BODY[:len(body.partial)] and len(body.partial) < SLICE
    assert Origin.asked == 2                  # the broken slice was not stored: asked again
    status, headers, body = get(None)
    assert status == 200 and body == BODY and Origin.asked == 3
    status, headers, body = get("bytes=100-199")
    assert status == 206 and body == BODY[100:200] and headers["X-Cache"] == "HIT" and Origin.asked == 3
