"""The durable term, vote and cluster state of one supervisor (safety property 1).

File format (UTF-8 JSON, one object):

    {"format": "failoverd-state", "version": 1,
     "sha256": "<hex digest of the canonical payload>",
     "payload": <PersistentState.to_wire()>}

The canonical payload is `json.dumps(payload, sort_keys=True,
separators=(",", ":"))`; the checksum catches a torn or bit-flipped file that
still happens to parse.

Rules:

* A missing file in an existing directory means a member that never voted:
  `load` returns a fresh `PersistentState()`. Anything else that is wrong
  (unreadable, corrupt, checksum mismatch, unknown version, a directory or FIFO
  where the file should be, a missing state directory) raises
  `StateFileError`. Silently starting again at term 0 could let this member
  vote twice in a term it already voted in, so the daemon must stop and an
  operator must look.
* `save` is atomic and durable: write a temp file in the same directory,
  flush, fsync it, rename it over the target, fsync the directory. A crash at
  any point leaves either the old or the new file, never a mix, and once
  `save` returns the new state survives power loss (given a disk that honours
  fsync). Callers MUST NOT send a message announcing a term or vote before
  `save` has returned (the persist-before-send contract, core/actions.py).

`save` is synchronous on purpose: the supervisor calls it inline on the event
loop between the core's `Persist` action and the following `Send`s, so no
other coroutine can observe or act on an unpersisted vote. The file is a few
KiB; the cost is two fsyncs, typically 1-10 ms on local SSD or a
battery-backed controller, but it can reach 100 ms or more on a busy spinning
disk or network storage, during which the event loop is blocked. Put the
state directory on local storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from failoverd.core.state import PersistentState

FORMAT = "failoverd-state"
FORMAT_VERSION = 1
# 50 history entries come to ~15 KiB; anything far larger is not ours.
STATE_FILE_BYTES_MAX = 1024 * 1024


class StateFileError(Exception):
    """The state file cannot be read or written; the message names the path."""


def _canonical(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_state(state: PersistentState) -> bytes:
    """The file contents for `state`."""
    payload = state.to_wire()
    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sha256": hashlib.sha256(_canonical(payload)).hexdigest(),
        "payload": payload,
    }
    return json.dumps(document, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"


def decode_state(data: bytes) -> PersistentState:
    """Parse file contents; ValueError says what is wrong (without the path)."""
    try:
        return _decode_state(data)
    except RecursionError:  # nesting near the limit can surface past json.loads
        raise ValueError("nested too deeply; the file is corrupt") from None


def _decode_state(data: bytes) -> PersistentState:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"not valid JSON ({error}); the file is corrupt or was torn") from None
    except ValueError as error:  # json.loads' own limits, e.g. integers of more than 4300 digits
        raise ValueError(f"not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f'not a failoverd state file (no "format": "{FORMAT}")')
    version = document.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"format version {version!r} is not the version {FORMAT_VERSION} this failoverd reads "
            "(written by another failoverd release?)"
        )
    if set(document) != {"format", "version", "sha256", "payload"}:
        raise ValueError(f"unexpected keys {sorted(document)}")
    payload = document["payload"]
    digest = hashlib.sha256(_canonical(payload)).hexdigest()
    if not isinstance(document["sha256"], str) or document["sha256"] != digest:
        raise ValueError("checksum mismatch; the file is corrupt")
    try:
        return PersistentState.from_wire(payload)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checksum matches but the state is invalid: {error}") from None


class StateFile:
    """The state file at `path` (e.g. `<cluster.state_dir>/state.json`).

    One supervisor per file: two processes saving the same file would each
    believe their own vote is the persisted one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> PersistentState:
        directory = self.path.parent
        try:
            # O_NONBLOCK: a FIFO in place of the file must raise, not hang start-up.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            if not directory.is_dir():
                # Most likely an unmounted volume or a typo in state_dir: a fresh
                # start there would forget every vote this member cast.
                raise StateFileError(
                    f"state file {self.path}: the state directory {directory} does not exist; "
                    "create it (owned by the failoverd user, mode 0700) for a new member"
                ) from None
            return PersistentState()
        except OSError as error:
            raise StateFileError(f"state file {self.path}: cannot open: {error.strerror or error}") from None
        try:
            data = self._read(fd)
        finally:
            os.close(fd)
        try:
            return decode_state(data)
        except ValueError as error:
            raise StateFileError(
                f"state file {self.path}: {error}. Refusing to start: resetting the term could let "
                "this member vote twice. Restore the file or, once no election is running, remove it "
                "deliberately."
            ) from None

    def _read(self, fd: int) -> bytes:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateFileError(f"state file {self.path}: not a regular file")
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError as error:
                raise StateFileError(f"state file {self.path}: cannot read: {error.strerror or error}") from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > STATE_FILE_BYTES_MAX:
                raise StateFileError(f"state file {self.path}: larger than {STATE_FILE_BYTES_MAX} bytes")
            chunks.append(chunk)

    def save(self, state: PersistentState) -> None:
        """Durably replace the file with `state`; StateFileError if that fails.

        On failure the previous file is untouched, and the caller must not
        send what depended on the new state.
        """
        if not isinstance(state, PersistentState):
            raise TypeError(f"save() takes a PersistentState, not {type(state).__name__}")
        data = encode_state(state)
        directory = self.path.parent
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as error:
            raise StateFileError(
                f"state file {self.path}: cannot create a temporary file in {directory}: {error.strerror or error}"
            ) from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, self.path)
        except BaseException as error:
            _unlink_quietly(temp)
            if isinstance(error, OSError):
                raise StateFileError(f"state file {self.path}: cannot write: {error.strerror or error}") from None
            raise
        # The rename is durable only once the directory entry is on disk.
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as error:
            raise StateFileError(
                f"state file {self.path}: written but the directory {directory} could not be "
                f"fsynced: {error.strerror or error}"
            ) from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
