"""Reading the cluster's shared secret (the HMAC key of peer messages).

Anyone who can read the secret can impersonate any supervisor, vote and send
heartbeats, so a file that others could read is refused rather than warned
about: a warning scrolls by, a refusal gets fixed. The secret itself never
appears in an exception or a log line; only the path does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SECRET_BYTES_MIN = 16
# Bounds the read; a real secret is a line of random text, not a file of megabytes.
SECRET_FILE_BYTES_MAX = 4096


class SecretError(Exception):
    """The secret file cannot be used; the message names the path and the reason."""


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret in `path`, with surrounding whitespace stripped.

    Stripping lets operators write the file with `echo` or an editor that adds
    a newline while every host still derives the same key.
    """
    shown = str(Path(path))
    try:
        # O_NONBLOCK: opening a FIFO put in place of the file must not hang start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise SecretError(f"secret file {shown}: does not exist") from None
    except OSError as error:
        raise SecretError(f"secret file {shown}: cannot open: {error.strerror or error}") from None
    try:
        # fstat on the opened descriptor, so the checks apply to what we read.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretError(f"secret file {shown}: not a regular file")
        if info.st_mode & 0o077:
            raise SecretError(
                f"secret file {shown}: mode {stat.S_IMODE(info.st_mode):04o} lets group or others "
                f"read or write it; run chmod 600 {shown}"
            )
        if info.st_size > SECRET_FILE_BYTES_MAX:
            raise SecretError(f"secret file {shown}: larger than {SECRET_FILE_BYTES_MAX} bytes")
        data = _read_all(fd, shown)
    finally:
        os.close(fd)
    secret = data.strip()
    if not secret:
        raise SecretError(f"secret file {shown}: empty")
    if len(secret) < SECRET_BYTES_MIN:
        raise SecretError(
            f"secret file {shown}: shorter than {SECRET_BYTES_MIN} bytes; generate one with e.g. `openssl rand -hex 32`"
        )
    return secret


def _read_all(fd: int, shown: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, SECRET_FILE_BYTES_MAX + 1)
        except OSError as error:
            raise SecretError(f"secret file {shown}: cannot read: {error.strerror or error}") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > SECRET_FILE_BYTES_MAX:  # the file grew after fstat
            raise SecretError(f"secret file {shown}: larger than {SECRET_FILE_BYTES_MAX} bytes")
        chunks.append(chunk)
