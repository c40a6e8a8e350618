"""Throwaway TLS certificates for tests, made with the `openssl` command
(the `tls_files` fixture of tests/unit/conftest.py and tests/daemon use them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def self_signed_cert(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A P-256 EC certificate and its unencrypted key, written into `directory`
    as <common_name>.pem and <common_name>.key.

    Valid for one day, for IP 127.0.0.1 only. Self-signed, so the certificate
    is also the CA that verifies it: one file serves as CA, server and client
    certificate at once, and a second one made here is a stranger to the
    first. Skips the test when openssl is not installed.
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    cert, key = directory / f"{common_name}.pem", directory / f"{common_name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            f"/CN={common_name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    key.chmod(0o600)  # a private key as it would be deployed: readable by its owner only
    return cert, key
