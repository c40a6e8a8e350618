"""The shared secret is read only from a private, regular, long-enough file,
and never shows up in an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from failoverd.config.secrets import SecretError, load_secret

SECRET = b"0123456789abcdef-very-secret"


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_reads_and_strips_whitespace(tmp_path: Path) -> None:
    path = write(tmp_path / "secret", b"  " + SECRET + b"\n")
    assert load_secret(path) == SECRET
    assert load_secret(str(path)) == SECRET


def test_owner_read_only_is_fine(tmp_path: Path) -> None:
    assert load_secret(write(tmp_path / "secret", SECRET, 0o400)) == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666, 0o610])
def test_group_or_other_bits_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "secret", SECRET, mode)
    with pytest.raises(SecretError, match=r"chmod 600") as info:
        load_secret(path)
    assert str(path) in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(SecretError, match="does not exist") as info:
        load_secret(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(SecretError, match="not a regular file"):
        load_secret(directory)


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretError, match="not a regular file"):
        load_secret(fifo)


@pytest.mark.parametrize("data", [b"", b"\n", b"   \t\n  "])
def test_empty(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(SecretError, match="empty"):
        load_secret(write(tmp_path / "secret", data))


def test_too_short_after_stripping(tmp_path: Path) -> None:
    short = b"fifteen-bytes!!"
    assert len(short) == 15
    with pytest.raises(SecretError, match="shorter than 16 bytes") as info:
        load_secret(write(tmp_path / "secret", b"   " + short + b"   \n"))
    assert short.decode() not in str(info.value)
    assert load_secret(write(tmp_path / "secret16", short + b"x\n")) == short + b"x"


def test_too_large(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="larger than"):
        load_secret(write(tmp_path / "secret", b"x" * 5000))


def test_secret_never_in_error_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "secret", SECRET, 0o644)
    with pytest.raises(SecretError) as info:
        load_secret(path)
    assert SECRET.decode() not in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_symlink_to_private_file_is_followed(tmp_path: Path) -> None:
    # Secret stores (systemd credentials, Kubernetes) hand out symlinks; the
    # checks apply to the file actually read.
    target = write(tmp_path / "real", SECRET)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert load_secret(link) == SECRET
    target.chmod(0o644)
    with pytest.raises(SecretError, match="group or others"):
        load_secret(link)
