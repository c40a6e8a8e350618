"""The state file: round trips, atomic and durable saves, and a loud refusal,
never a silent reset of the term, whenever the file is not exactly ours."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from failoverd.adapters import statefile
from failoverd.adapters.statefile import StateFile, StateFileError, decode_state, encode_state
from failoverd.core.state import ClusterState, HistoryEntry, PersistentState, Position, StateStamp

RICH = PersistentState(
    term=7,
    voted_for="b",
    state=ClusterState(
        stamp=StateStamp(7, 12),
        primary="b",
        sync_count=1,
        paused=False,
        switchover_to=None,
        history=(HistoryEntry(7, "a", "b", "failover", Position(2, 123456789), 1718000000.25),),
    ),
    commit_version=11,
)


@pytest.fixture
def sf(tmp_path: Path) -> StateFile:
    return StateFile(tmp_path / "state.json")


def test_missing_file_in_existing_dir_is_fresh(sf: StateFile) -> None:
    assert sf.load() == PersistentState()


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match=r"state directory .* does not exist"):
        StateFile(tmp_path / "gone" / "state.json").load()


def test_round_trip(sf: StateFile) -> None:
    sf.save(RICH)
    assert sf.load() == RICH
    sf.save(PersistentState(term=8))
    assert sf.load() == PersistentState(term=8)
    assert StateFile(sf.path).load() == PersistentState(term=8)


def test_file_is_private_and_no_temp_file_left(sf: StateFile) -> None:
    sf.save(RICH)
    sf.save(RICH)
    assert os.listdir(sf.path.parent) == ["state.json"]
    assert sf.path.stat().st_mode & 0o777 == 0o600


def test_format_is_versioned_json_with_checksum(sf: StateFile) -> None:
    sf.save(RICH)
    document = json.loads(sf.path.read_bytes())
    assert document["format"] == "failoverd-state"
    assert document["version"] == 1
    assert len(document["sha256"]) == 64
    assert document["payload"] == RICH.to_wire()


def refused(sf: StateFile, data: bytes, match: str) -> None:
    sf.path.write_bytes(data)
    with pytest.raises(StateFileError, match=match) as info:
        sf.load()
    assert str(sf.path) in str(info.value)
    assert "Refusing to start" in str(info.value)


def test_corrupt_json(sf: StateFile) -> None:
    refused(sf, b"{not json", "not valid JSON")


def test_not_utf8(sf: StateFile) -> None:
    refused(sf, b"\xff\xfe\x00", "not valid JSON")


def test_empty_file(sf: StateFile) -> None:
    refused(sf, b"", "not valid JSON")


def test_truncated_file(sf: StateFile) -> None:
    sf.save(RICH)
    data = sf.path.read_bytes()
    for cut in (1, len(data) // 2, len(data) - 3):
        refused(sf, data[:cut], "not valid JSON")


def test_bad_checksum(sf: StateFile) -> None:
    sf.save(RICH)
    document = json.loads(sf.path.read_bytes())
    document["payload"]["term"] = 6  # a bit flip that still parses
    refused(sf, json.dumps(document).encode(), "checksum mismatch")


def test_every_single_byte_change_is_detected(sf: StateFile) -> None:
    data = encode_state(RICH)
    for index in range(0, len(data), 3):
        flipped = bytearray(data)
        flipped[index] ^= 0x01
        try:
            decoded = decode_state(bytes(flipped))
        except ValueError:
            continue
        # Only changes the checksum cannot see (whitespace, key order) may pass, and they change nothing.
        assert decoded == RICH, (index, bytes(flipped[max(0, index - 20) : index + 20]))


def test_wrong_version(sf: StateFile) -> None:
    document = json.loads(encode_state(RICH))
    document["version"] = 2
    refused(sf, json.dumps(document).encode(), "format version 2")


def test_not_our_format(sf: StateFile) -> None:
    refused(sf, b'{"term": 3}', "not a failoverd state file")
    refused(sf, b"[]", "not a failoverd state file")


def test_valid_checksum_but_invalid_state(sf: StateFile) -> None:
    payload = RICH.to_wire() | {"term": -1}
    document = {
        "format": "failoverd-state",
        "version": 1,
        "payload": payload,
        "sha256": statefile.hashlib.sha256(statefile._canonical(payload)).hexdigest(),
    }
    refused(sf, json.dumps(document).encode(), "state is invalid")


def test_directory_in_place_of_file(sf: StateFile) -> None:
    sf.path.mkdir()
    with pytest.raises(StateFileError, match="state file"):
        sf.load()
    with pytest.raises(StateFileError, match="cannot write"):
        sf.save(RICH)
    assert os.listdir(sf.path.parent) == ["state.json"]  # no temp file left behind


def test_fifo_in_place_of_file_does_not_hang(sf: StateFile) -> None:
    os.mkfifo(sf.path)
    with pytest.raises(StateFileError, match="not a regular file"):
        sf.load()


def test_oversized_file(sf: StateFile) -> None:
    sf.path.write_bytes(b" " * (statefile.STATE_FILE_BYTES_MAX + 1))
    with pytest.raises(StateFileError, match="larger than"):
        sf.load()


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="cannot create a temporary file"):
        StateFile(tmp_path / "gone" / "state.json").save(RICH)


def test_save_refuses_other_types(sf: StateFile) -> None:
    with pytest.raises(TypeError):
        sf.save(RICH.to_wire())  # type: ignore[arg-type]


def test_failed_rename_keeps_old_file(sf: StateFile, monkeypatch: pytest.MonkeyPatch) -> None:
    sf.save(RICH)

    def broken_rename(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(statefile.os, "rename", broken_rename)
    with pytest.raises(StateFileError, match="Input/output error"):
        sf.save(PersistentState(term=99))
    monkeypatch.undo()
    assert sf.load() == RICH
    assert os.listdir(sf.path.parent) == ["state.json"]


def test_failed_fsync_keeps_old_file(sf: StateFile, monkeypatch: pytest.MonkeyPatch) -> None:
    sf.save(RICH)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "fsync", broken_fsync)
    with pytest.raises(StateFileError, match="No space left"):
        sf.save(PersistentState(term=99))
    monkeypatch.undo()
    assert sf.load() == RICH
    assert os.listdir(sf.path.parent) == ["state.json"]


def test_save_fsyncs_file_before_rename_and_directory_after(sf: StateFile, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        calls.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(statefile.os, "fsync", fsync)
    monkeypatch.setattr(statefile.os, "rename", rename)
    sf.save(RICH)
    assert calls == ["fsync-file", "rename", "fsync-dir"]


def test_json_that_breaks_the_parser_is_a_state_file_error(sf: StateFile) -> None:
    # Nesting near the recursion limit and huge integers raise RecursionError or
    # a plain ValueError inside json/from_wire; load must still say StateFileError.
    limit = sys.getrecursionlimit()
    payloads: list[bytes] = [b"9" * 5000]
    payloads += [b"[" * depth + b"]" * depth for depth in range(limit - 400, limit + 30, 2)]
    for value in payloads:
        for checksum in (b"0" * 64, None):
            wire = json.dumps(RICH.to_wire()).replace('"term": 7', '"term": @').encode().replace(b"@", value)
            if checksum is None:
                try:
                    checksum = statefile.hashlib.sha256(statefile._canonical(json.loads(wire))).hexdigest().encode()
                except (RecursionError, ValueError):
                    continue
            sf.path.write_bytes(
                b'{"format": "failoverd-state", "version": 1, "sha256": "' + checksum + b'", "payload": ' + wire + b"}"
            )
            with pytest.raises(StateFileError):
                sf.load()
