"""Fixtures shared by the unit tests' modules (a test module never imports
fixtures from another)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tls import self_signed_cert


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One self-signed certificate for 127.0.0.1 and its key, used as CA,
    server and client certificate at once (skips without openssl)."""
    return self_signed_cert(tmp_path_factory.mktemp("tls"), "failoverd-test")
