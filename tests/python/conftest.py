"""A real cluster for the Python client's tests: one gateway and two agents, each
the `arpcp` binary (env ARPCP_BIN, default target/debug/arpcp) on port 0 with its
own data directory. Each process's first stdout line (JSON) says where it listens."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import pytest

from arpcp_client import Client

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0


def arpcp_bin() -> Path:
    path = Path(os.environ.get("ARPCP_BIN", "target/debug/arpcp"))
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        pytest.exit(f"no arpcp binary at {path}: run `cargo build` or set ARPCP_BIN", returncode=2)
    return path


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log: Path
    ready: Dict[str, Any] = field(default_factory=dict)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def read_ready_line(self, timeout: float = STARTUP_TIMEOUT) -> Dict[str, Any]:
        """Reads the first stdout line (without blocking past ``timeout``)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        buf = b""
        end = time.monotonic() + timeout
        while b"\n" not in buf:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                chunk = None
            if chunk:
                buf += chunk
                continue
            if chunk == b"" or self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.poll()}) before it was ready:\n{self.log_tail()}"
                )
            if time.monotonic() >= end:
                raise RuntimeError(f"{self.name} printed no ready line in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.ready = json.loads(buf.split(b"\n", 1)[0])
        return self.ready

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


@dataclass
class Cluster:
    grpc: str
    arpcp: str
    gateway: Daemon
    agents: List[Daemon]

    @property
    def agent_ports(self) -> List[int]:
        return [int(a.ready["arpcp"].rsplit(":", 1)[1]) for a in self.agents]

    def logs(self) -> str:
        return "\n".join(f"--- {d.name} ---\n{d.log_tail()}" for d in [self.gateway, *self.agents])


def start(binary: Path, name: str, args: List[str], tmp: Path) -> Daemon:
    log = tmp / f"{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(binary), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    return Daemon(name, proc, log)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    binary = arpcp_bin()
    tmp = tmp_path_factory.mktemp("cluster")
    daemons: List[Daemon] = []
    try:
        gw = start(
            binary,
            "gateway",
            [
                "gateway",
                "--grpc", "127.0.0.1:0",
                "--arpcp", "127.0.0.1:0",
                "--data-dir", str(tmp / "gateway"),
                "--echo-interval-ms", "200",
            ],
            tmp,
        )
        daemons.append(gw)
        ready = gw.read_ready_line()
        assert ready["role"] == "gateway", ready
        # Both agents offer the example Opal model.
        config = tmp / "agent.toml"
        model = REPO / "examples" / "opal" / "trajectory.py"
        config.write_text(
            '[[procedure]]\nname = "trajectory"\nkind = "opal"\n'
            f'command = ["python3", "{model}"]\npoll_ms = 100\n'
        )
        agents = []
        for i in (1, 2):
            a = start(
                binary,
                f"agent{i}",
                [
                    "agent",
                    "--listen", "127.0.0.1:0",
                    "--data-dir", str(tmp / f"agent{i}"),
                    "--controller", ready["arpcp"],
                    "--config", str(config),
                ],
                tmp,
            )
            daemons.append(a)
            assert a.read_ready_line()["role"] == "agent", a.ready
            agents.append(a)
        c = Cluster(ready["grpc"], ready["arpcp"], gw, agents)
        with Client(c.grpc, timeout=5) as client:

            def two_alive():
                try:
                    alive = [x for x in client.agents() if x.state == "alive"]
                except Exception:
                    return None
                return len(alive) == 2

            end = time.monotonic() + STARTUP_TIMEOUT
            while not two_alive():
                if time.monotonic() >= end:
                    raise RuntimeError(f"the gateway did not see 2 alive agents in time:\n{c.logs()}")
                time.sleep(0.05)
        yield c
    finally:
        for d in reversed(daemons):
            d.stop()


@pytest.fixture(scope="session")
def client(cluster: Cluster):
    with Client(cluster.grpc, timeout=10) as c:
        yield c
