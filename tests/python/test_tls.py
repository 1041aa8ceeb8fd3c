"""The Python client against a gateway with TLS: a client certificate, a bearer
token, the roles, and the errors a user meets without them. Certificates and
tokens are made with the real `arpcp ca` and `arpcp token` commands."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import grpc
import pytest

from arpcp_client import Client, GatewayError

from conftest import STARTUP_TIMEOUT, Daemon, arpcp_bin, start


def run(binary: Path, *args: str) -> str:
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"arpcp {' '.join(args)}: {out.stderr}"
    return out.stdout


class TlsCluster:
    def __init__(self, grpc_addr: str, pki: Path, tokens: Dict[str, str]) -> None:
        self.grpc = grpc_addr
        self.pki = pki
        self.tokens = tokens

    def client(self, **kw: object) -> Client:
        return Client(self.grpc, timeout=10, ca=self.pki / "ca.pem", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    binary = arpcp_bin()
    tmp = tmp_path_factory.mktemp("tls")
    pki = tmp / "pki"
    run(binary, "ca", "init", "--dir", str(pki))
    run(binary, "ca", "issue", "gateway", "--dir", str(pki), "--san", "127.0.0.1", "--san", "localhost")
    run(binary, "ca", "issue", "agent", "agent-1", "--dir", str(pki))
    run(binary, "ca", "issue", "client", "alice", "--role", "submitter", "--dir", str(pki))
    run(binary, "ca", "issue", "client", "rita", "--role", "reader", "--dir", str(pki))
    data = tmp / "gateway"
    tokens = {
        role: run(binary, "token", "create", f"py-{role}", "--role", role, "--data-dir", str(data)).strip()
        for role in ("reader", "submitter")
    }
    daemons: List[Daemon] = []
    try:
        gw = start(
            binary,
            "gateway",
            [
                "gateway",
                "--grpc", "127.0.0.1:0",
                "--arpcp", "127.0.0.1:0",
                "--data-dir", str(data),
                "--echo-interval-ms", "200",
                "--tls-dir", str(pki),
            ],
            tmp,
        )
        daemons.append(gw)
        ready = gw.read_ready_line()
        agent = start(
            binary,
            "agent1",
            [
                "agent",
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp / "agent1"),
                "--controller", ready["arpcp"],
                "--tls-dir", str(pki),
                "--tls-name", "agent-1",
            ],
            tmp,
        )
        daemons.append(agent)
        agent.read_ready_line()
        c = TlsCluster(ready["grpc"], pki, tokens)
        with c.client(token=tokens["reader"]) as reader:
            end = time.monotonic() + STARTUP_TIMEOUT
            while not any(a.state == "alive" for a in reader.agents()):
                if time.monotonic() >= end:
                    raise RuntimeError(f"no alive agent in time:\n{gw.log_tail()}\n{agent.log_tail()}")
                time.sleep(0.05)
        yield c
    finally:
        for d in reversed(daemons):
            d.stop()


def test_a_submitter_token_runs_a_task(tls: TlsCluster) -> None:
    with tls.client(token=tls.tokens["submitter"]) as c:
        assert c.call("add", 2, 3) == 5


def test_a_client_certificate_runs_a_task(tls: TlsCluster) -> None:
    with tls.client(cert=tls.pki / "alice.pem") as c:
        task = c.wait(c.submit("add", 4, 5), timeout=30)
        assert task.result == 9


def test_the_token_comes_from_the_environment(tls: TlsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARPCP_TOKEN", tls.tokens["submitter"])
    with tls.client() as c:
        assert c.call("add", 1, 1) == 2


def test_without_credentials_the_call_is_unauthenticated(tls: TlsCluster) -> None:
    with tls.client() as c, pytest.raises(GatewayError) as e:
        c.agents()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, e.value
    assert "token" in e.value.message


def test_a_reader_cannot_submit(tls: TlsCluster) -> None:
    for creds in ({"token": tls.tokens["reader"]}, {"cert": tls.pki / "rita.pem"}):
        with tls.client(**creds) as c:
            assert c.agents()
            with pytest.raises(GatewayError) as e:
                c.submit("add", 1, 2)
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED, e.value
            assert "submitter" in e.value.message


def test_a_wrong_token_is_unauthenticated(tls: TlsCluster) -> None:
    with tls.client(token="arpcp_not-a-token") as c, pytest.raises(GatewayError) as e:
        c.agents()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, e.value


def test_plaintext_against_a_tls_gateway_fails(tls: TlsCluster) -> None:
    with Client(tls.grpc, timeout=5) as c, pytest.raises(GatewayError) as e:
        c.agents()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value


def test_credentials_need_tls(tls: TlsCluster) -> None:
    with pytest.raises(ValueError, match="ca="):
        Client(tls.grpc, token=tls.tokens["reader"])
    with pytest.raises(ValueError, match="cannot read CA certificate"):
        Client(tls.grpc, ca=tls.pki / "missing.pem")


def test_the_asyncio_client_speaks_tls_with_a_token_and_a_certificate(tls: TlsCluster) -> None:
    import asyncio

    from arpcp_client import aio

    async def main() -> None:
        ca = tls.pki / "ca.pem"
        async with aio.Client(tls.grpc, timeout=10, ca=ca, token=tls.tokens["submitter"]) as c:
            task_id = await c.submit("add", 20, 22)
            assert await c.result(task_id, timeout=30) == 42
            assert (await c.get(task_id)).owner == "token:py-submitter"
        async with aio.Client(tls.grpc, timeout=10, ca=ca, cert=tls.pki / "rita.pem") as c:
            with pytest.raises(GatewayError) as e:
                await c.submit("add", 1, 2)
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED, e.value

    asyncio.run(main())


def test_the_owner_of_a_task_is_its_submitter(tls: TlsCluster) -> None:
    with tls.client(cert=tls.pki / "alice.pem") as c:
        assert c.get(c.submit("add", 1, 2)).owner == "cert:alice"
