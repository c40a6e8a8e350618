"""A running `failoverd run` to attack: the witness of a 2 data + 1 witness
cluster. A witness needs no PostgreSQL, so this runs anywhere; its data
members are absent, so nothing but the attacker ever talks to it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port, wait_for_sync

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningWitness:
    proc: subprocess.Popen
    base: Path
    secret: bytes
    token: bytes
    peer_port: int
    api_port: int
    stderr_path: Path
    config_path: Path

    @property
    def state_file(self) -> Path:
        return self.base / "state" / "w1" / "state.json"

    def state_bytes(self) -> bytes:
        return self.state_file.read_bytes() if self.state_file.exists() else b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        out = []
        for line in self.stderr().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def config_text(
    base: Path, peer_ports: dict[str, int], api_ports: dict[str, int], extra: str = "", cluster_extra: str = ""
) -> str:
    nodes = []
    for name in ("db1", "db2"):
        nodes.append(f'''
[[nodes]]
name = "{name}"
peer = "127.0.0.1:{peer_ports[name]}"
api = "127.0.0.1:{api_ports[name]}"
postgres = {{ data_dir = "{base}/{name}/data", port = {free_port()} }}
''')
    nodes.append(f"""
[[nodes]]
name = "w1"
kind = "witness"
peer = "127.0.0.1:{peer_ports["w1"]}"
api = "127.0.0.1:{api_ports["w1"]}"
""")
    return (
        f'''
[cluster]
name = "fuzz"
secret_file = "{base}/secret"
state_dir = "{base}/state"
{cluster_extra}

[api]
listen = "127.0.0.1:{api_ports["w1"]}"
token_file = "{base}/token"

[logging]
format = "json"
'''
        + extra
        + "".join(nodes)
    )


def start_witness(
    base: Path, *, extra_config: str = "", cluster_extra: str = "", env: dict[str, str] | None = None
) -> RunningWitness:
    secret = secrets.token_hex(32).encode()
    token = secrets.token_hex(32).encode()
    for name, value in (("secret", secret), ("token", token)):
        path = base / name
        path.write_bytes(value + b"\n")
        path.chmod(0o600)
    peer_ports = {n: free_port() for n in ("db1", "db2", "w1")}
    api_ports = {n: free_port() for n in ("db1", "db2", "w1")}
    config = base / "failoverd.toml"
    config.write_text(config_text(base, peer_ports, api_ports, extra_config, cluster_extra))
    stderr_path = base / "stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "failoverd", "run", "--config", str(config), "--node", "w1"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    w = RunningWitness(proc, base, secret, token, peer_ports["w1"], api_ports["w1"], stderr_path, config)

    def listening() -> bool:
        if not w.alive():
            raise RuntimeError(f"witness exited {proc.returncode}: {w.stderr()[-2000:]}")
        return all(_listening(p) for p in (w.peer_port, w.api_port))

    try:
        wait_for_sync("the witness listening", listening, 20, detail=lambda: w.stderr()[-2000:])
    except AssertionError:
        stop_witness(w)
        raise
    return w


def _listening(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_witness(w: RunningWitness) -> None:
    if w.alive():
        w.proc.send_signal(signal.SIGTERM)  # by the PID we started
        try:
            w.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=5)
