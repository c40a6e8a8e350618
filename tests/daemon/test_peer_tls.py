"""Optional mutual TLS on the peer port of a running supervisor: members
with a certificate signed by the cluster's CA get in, nobody else does, and
the session MACs are still required inside TLS."""

from __future__ import annotations

import json
import socket
import ssl

import pytest
from daemon_fixture import start_witness, stop_witness

from tests.support.peer_stream import exchange
from tests.support.tls import self_signed_cert


@pytest.fixture(scope="module")
def tls_witness(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("peer-tls")
    cert, key = self_signed_cert(base_dir, "cluster")  # self-signed: the cluster's CA and every member's certificate
    w = start_witness(base_dir, cluster_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_ca = "{cert}"\n')
    yield w, cert, key, base_dir
    stop_witness(w)


def send(w, context: ssl.SSLContext | None, **kwargs):
    kwargs.setdefault("secret", w.secret)
    return exchange(w.peer_port, cluster="fuzz", recipient="w1", context=context, **kwargs)


def test_a_member_certificate_and_the_macs_get_in(tls_witness):
    w, cert, key, _ = tls_witness
    context = ssl.create_default_context(cafile=cert)
    context.load_cert_chain(cert, key)
    body = json.dumps({"type": "timeout_now", "cluster": "fuzz", "sender": "db1", "term": 0}).encode()
    taken = send(w, context, bodies=[body])
    assert taken.welcomed and not taken.refused, taken
    # TLS does not replace the MACs: a hello without the secret is refused.
    refused = send(w, context, secret=b"not-the-cluster-secret-0123456789", bodies=[body])
    assert not refused.welcomed and refused.close_code == 4401, refused


def test_no_client_certificate_or_a_foreign_one_is_refused_in_the_handshake(tls_witness):
    w, cert, key, base_dir = tls_witness
    member = ssl.create_default_context(cafile=cert)
    member.load_cert_chain(cert, key)
    assert upgraded(w.peer_port, member)  # the probe itself works
    without = ssl.create_default_context(cafile=cert)
    foreign_cert, foreign_key = self_signed_cert(base_dir, "intruder")
    foreign = ssl.create_default_context(cafile=cert)
    foreign.load_cert_chain(foreign_cert, foreign_key)
    for context in (without, foreign, None):
        assert not upgraded(w.peer_port, context)
    assert w.alive()


UPGRADE = b"GET /peer/v3/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
UPGRADE += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"


def upgraded(port: int, context: ssl.SSLContext | None) -> bool:
    """Whether a websocket upgrade gets its 101 over `context` (None: no TLS at all)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            if context is None:
                raw.sendall(UPGRADE)
                return raw.recv(4096).startswith(b"HTTP/1.1 101")
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                conn.sendall(UPGRADE)
                return conn.recv(4096).startswith(b"HTTP/1.1 101")
        except (ssl.SSLError, ConnectionError):
            return False
