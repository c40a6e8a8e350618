"""Optional mutual TLS on the peer endpoint of a running supervisor: members
with a certificate signed by the cluster's CA get in, nobody else does, and
the HMAC signature is still required inside TLS."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request

import pytest
from daemon_fixture import start_witness, stop_witness

from failoverd.adapters.peers import PATH, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.support.tls import self_signed_cert


@pytest.fixture(scope="module")
def tls_witness(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("peer-tls")
    cert, key = self_signed_cert(base_dir, "cluster")  # self-signed: the cluster's CA and every member's certificate
    w = start_witness(base_dir, cluster_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_ca = "{cert}"\n')
    yield w, cert, key, base_dir
    stop_witness(w)


def post(port: int, body: bytes, headers: dict, context: ssl.SSLContext | None, scheme: str = "https") -> int:
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{PATH}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def signed(w, body: bytes) -> dict:
    stamp = f"{time.time():.6f}"
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(w.secret, stamp, "w1", body)}


def test_a_member_certificate_and_a_signature_get_in(tls_witness):
    w, cert, key, _ = tls_witness
    context = ssl.create_default_context(cafile=cert)
    context.load_cert_chain(cert, key)
    body = json.dumps({"type": "timeout_now", "cluster": "fuzz", "sender": "db1", "term": 0}).encode()
    assert post(w.peer_port, body, signed(w, body), context) == 204
    assert post(w.peer_port, body, {}, context) == 401  # TLS does not replace the HMAC


def test_no_client_certificate_or_a_foreign_one_is_refused_in_the_handshake(tls_witness):
    w, cert, _, base_dir = tls_witness
    body = b"{}"
    without = ssl.create_default_context(cafile=cert)
    foreign_cert, foreign_key = self_signed_cert(base_dir, "intruder")
    foreign = ssl.create_default_context(cafile=cert)
    foreign.load_cert_chain(foreign_cert, foreign_key)
    for context in (without, foreign):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            post(w.peer_port, body, signed(w, body), context)
    with pytest.raises((urllib.error.URLError, ConnectionError, http_client_errors())):
        post(w.peer_port, body, signed(w, body), None, scheme="http")
    assert w.alive()


def http_client_errors():
    import http.client

    return http.client.HTTPException
