"""TLS towards upstreams: how TLS failures are reported (RFC 9209)."""

from __future__ import annotations

import ssl

import pytest

from edge.proxy import proxy_status
from edge.upstream.client import UpstreamError
from edge.upstream.http1 import Address, tls_error


WWW = "www.example.com"


# --------------------------------------------------------------------------- pure rules

def _ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
    exc.reason = reason
    return exc


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.reason, exc.verify_message = "CERTIFICATE_VERIFY_FAILED", message
    return exc


@pytest.mark.parametrize("exc, error, params, detail", [
    (_verify_error("unable to get local issuer certificate"), "tls_certificate_error", (),
     "https://o.example:8443: unable to get local issuer certificate"),
    # TLS 1.3: the server refuses a missing client certificate after our side of the handshake.
    (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "tls_alert_received",
     (("alert-id", 116), ("alert-message", "certificate_required")),
     "https://o.example:8443: the upstream sent TLS alert certificate_required (116)"),
    (_ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), "tls_alert_received",       # the same refusal in TLS 1.2
     (("alert-id", 40), ("alert-message", "handshake_failure")), None),
    (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "tls_alert_received",              # our certificate, not trusted there
     (("alert-id", 48), ("alert-message", "unknown_ca")), None),
    (_ssl_error("TLSV1_UNRECOGNIZED_NAME"), "tls_alert_received",             # an alert without ALERT in its name
     (("alert-id", 112), ("alert-message", "unrecognized_name")), None),
    (_ssl_error("TLSV1_ALERT_SOMETHING_NEW"), "tls_alert_received",           # known to OpenSSL, not to the table
     (("alert-message", "something_new"),), None),
    (_ssl_error("WRONG_VERSION_NUMBER"), "tls_protocol_error", (), None),     # found here: not an alert
    (_ssl_error("CERTIFICATE_VERIFY_FAILED"), "tls_protocol_error", (), None),
])
def test_tls_errors_map_to_rfc_9209_types(exc, error, params, detail):
    mapped = tls_error(exc, Address("https", "o.example", 8443))
    assert (mapped.error, mapped.params) == (error, params)
    if detail is not None:
        assert mapped.detail == detail


def test_proxy_status_carries_the_alert_parameters():
    exc = UpstreamError("tls_alert_received", 'https://o: alert "x"', ["origin"],
                        (("alert-id", 116), ("alert-message", "certificate_required")))
    assert proxy_status("l1-1", exc) == ('l1-1; error=tls_alert_received; alert-id=116; '
                                         'alert-message="certificate_required"; details="https://o: alert \\"x\\""')
    assert proxy_status("l1-1", UpstreamError("connection_refused", "x", [])) == \
        'l1-1; error=connection_refused; details="x"'
