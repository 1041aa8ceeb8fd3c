"""The Python client against a real gateway with two agents (see conftest.py)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import signal
import socket
import threading
import time
import uuid
from typing import Callable, Optional, TypeVar

import grpc
import pytest

from conftest import arpcp_bin, start

from arpcp_client import (
    FINAL_STATUSES,
    ArpcpError,
    Client,
    ClientClosed,
    GatewayError,
    ProcedureSchema,
    Table,
    Task,
    TaskFailed,
    TaskHandle,
    TaskStatus,
)

# Every wait in these tests ends by this many seconds.
WAIT = 20.0
BUILTINS = {"add", "sub", "mul", "div", "echo", "sleep", "time", "memory_usage", "running_processes"}
T = TypeVar("T")


def poll(what: str, check: Callable[[], Optional[T]], timeout: float = WAIT) -> T:
    """Calls ``check`` until it returns something truthy; fails after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def agent_ids(client: Client) -> list[str]:
    return sorted(a.agent_id for a in client.agents())


def test_submit_and_wait_returns_an_int_result(client: Client) -> None:
    task_id = client.submit("add", 2, 3)
    assert isinstance(task_id, str) and task_id
    task = client.wait(task_id, timeout=WAIT)
    assert isinstance(task, Task)
    assert task.status == "done"
    assert task.result == 5 and type(task.result) is int
    assert task.args == [2, 3]
    assert task.error == "" and task.error_code == 0
    assert task.agent_id in agent_ids(client)
    assert isinstance(task.created_at, dt.datetime) and task.created_at.tzinfo is not None
    assert task.started_at is not None and task.finished_at is not None
    assert task.created_at <= task.started_at <= task.finished_at
    assert abs(dt.datetime.now(dt.timezone.utc) - task.created_at) < dt.timedelta(minutes=5)
    # Without `wait`, get returns the stored task at once.
    assert client.get(task_id) == task


def test_call_runs_synchronously(client: Client) -> None:
    assert client.call("mul", 4, 5, timeout=WAIT) == 20
    assert client.call("div", 1, 4, timeout=WAIT) == 0.25
    assert client.call("sub", 2, 3.5) == -1.5


def test_kwargs_reach_echo(client: Client) -> None:
    kwargs = {"name": "x", "n": 3, "ratio": 0.5, "flag": True, "nothing": None, "nested": {"a": [1, "b"]}}
    assert client.call("echo", timeout=WAIT, **kwargs) == kwargs
    task_id = client.submit("echo", **kwargs)
    task = client.wait(task_id, timeout=WAIT)
    assert task.status == "done"
    assert task.kwargs == kwargs and task.args == []
    assert task.result == kwargs
    # Positional arguments come back as a list.
    assert client.call("echo", 1, "two", [3]) == [1, "two", [3]]


def test_a_failed_call_raises_task_failed(client: Client) -> None:
    with pytest.raises(TaskFailed) as e:
        client.call("div", 1, 0, timeout=WAIT)
    assert e.value.status == "failed"
    assert "division by zero" in e.value.error
    assert e.value.error_code == 400
    with pytest.raises(TaskFailed) as e:
        client.call("add", 1, timeout=WAIT)
    assert e.value.status == "client_error"
    assert "add" in e.value.error
    assert e.value.error_code == 204


def test_unknown_procedure_is_not_found_and_names_it(client: Client) -> None:
    with pytest.raises(GatewayError) as e:
        client.submit("no_such_procedure_xyz", 1)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "no_such_procedure_xyz" in e.value.message
    with pytest.raises(GatewayError) as e:
        client.call("no_such_procedure_xyz")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_empty_procedure_is_invalid_argument_naming_the_field(client: Client) -> None:
    with pytest.raises(GatewayError) as e:
        client.submit("")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "procedure" in e.value.message
    assert "INVALID_ARGUMENT" in str(e.value)


def test_unknown_task_is_not_found(client: Client) -> None:
    missing = str(uuid.uuid4())
    for call in (
        lambda: client.get(missing),
        lambda: client.get(missing, wait=1),
        lambda: list(client.watch(missing, timeout=WAIT)),
        lambda: client.cancel(missing),
    ):
        with pytest.raises(GatewayError) as e:
            call()
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert missing in e.value.message


def test_watch_follows_progress_until_done(client: Client) -> None:
    task_id = client.submit("sleep", 1)
    seen = list(client.watch(task_id, timeout=WAIT))
    assert seen, "watch yielded nothing"
    assert seen[-1].status == "done"
    assert all(not t.ended for t in seen[:-1]), [t.status for t in seen]
    fractions = [t.progress.fraction for t in seen if t.status == "running" and t.progress]
    assert len(set(f for f in fractions if 0 < f < 1)) >= 2, fractions
    assert fractions == sorted(fractions), fractions
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_on_done_calls_back_from_another_thread(client: Client) -> None:
    called = threading.Event()
    got: list[tuple[Task, threading.Thread]] = []

    def callback(task: Task) -> None:
        got.append((task, threading.current_thread()))
        called.set()

    task_id = client.submit("sleep", 0.3)
    future = client.on_done(task_id, callback)
    assert called.wait(WAIT), "the callback was not called"
    task, thread = got[0]
    assert task.task_id == task_id and task.status == "done"
    assert thread is not threading.main_thread()
    assert future.result(timeout=WAIT) == task


def test_cancel_stops_a_running_task(client: Client) -> None:
    task_id = client.submit("sleep", 30)
    poll("the task to run", lambda: client.get(task_id).status == "running")
    cancelled = client.cancel(task_id)
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    assert client.wait(task_id, timeout=WAIT).status == "cancelled"
    # The agent's slot is free again: nothing runs there any more.
    agent = cancelled.agent_id
    poll(
        "the agent to report no running task",
        lambda: [a.running for a in client.agents() if a.agent_id == agent] == [0],
    )
    # Cancelling an ended task leaves it as it is.
    done = client.wait(client.submit("add", 1, 1), timeout=WAIT)
    assert client.cancel(done.task_id).status == "done"


def test_tasks_filters_and_pages(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # `mul` with these arguments is submitted by this test only.
    ids = [client.submit("mul", i, 1000) for i in range(5)]
    for task_id in ids:
        assert client.wait(task_id, timeout=WAIT).status == "done"
    bad = client.submit("mul", "x", 1000)
    assert client.wait(bad, timeout=WAIT).status == "client_error"

    tokens: list[str] = []
    list_tasks = client._stub.ListTasks

    def spy(req, **kw):
        tokens.append(req.page_token)
        return list_tasks(req, **kw)

    monkeypatch.setattr(client._stub, "ListTasks", spy)
    mine = [t for t in client.tasks(procedure="mul", page_size=2) if t.task_id in ids + [bad]]
    # Newest first, every task once, across several pages.
    assert [t.task_id for t in mine] == [bad] + ids[::-1]
    assert len(tokens) >= 3 and tokens[0] == "" and all(tokens[1:]), tokens
    assert len(set(tokens)) == len(tokens)

    done = list(client.tasks(status="done", procedure="mul", page_size=2))
    assert all(t.status == "done" and t.procedure == "mul" for t in done)
    assert set(ids) <= {t.task_id for t in done}
    assert bad not in {t.task_id for t in done}
    errors = list(client.tasks(status="client_error", procedure="mul"))
    assert bad in {t.task_id for t in errors}
    assert all(t.status == "client_error" for t in errors)

    agent = client.get(ids[0]).agent_id
    on_agent = list(client.tasks(agent_id=agent, page_size=3))
    assert on_agent and all(t.agent_id == agent for t in on_agent)
    assert ids[0] in {t.task_id for t in on_agent}

    with pytest.raises(ValueError):
        list(client.tasks(status="no_such_status"))


def test_agents_shows_two_alive_agents(client: Client, cluster) -> None:
    agents = client.agents()
    assert len(agents) == 2
    assert sorted(a.port for a in agents) == sorted(cluster.agent_ports)
    assert len({a.agent_id for a in agents}) == 2
    for a in agents:
        assert a.state == "alive"
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", a.mac), a.mac
        ipaddress.ip_address(a.ip)
        assert a.address.endswith(f":{a.port}")
        assert BUILTINS <= set(a.procedures)
        assert a.capacity >= 1 and not a.blacklisted
        assert isinstance(a.last_seen, dt.datetime)


def test_procedures_lists_builtins_on_both_agents(client: Client) -> None:
    procedures = client.procedures()
    both = agent_ids(client)
    assert BUILTINS <= set(procedures)
    for name in BUILTINS:
        assert sorted(procedures[name]) == both, (name, procedures[name])


def test_blacklist_refuses_the_agent_and_unblacklist_restores_it(client: Client) -> None:
    black, other = agent_ids(client)
    try:
        assert client.blacklist(black).blacklisted
        with pytest.raises(GatewayError) as e:
            client.submit("add", 1, 2, agent_id=black)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert black in e.value.message
        # The scheduler places tasks on the other agent meanwhile.
        for _ in range(3):
            task = client.wait(client.submit("add", 1, 2), timeout=WAIT)
            assert task.status == "done" and task.agent_id == other
        assert client.procedures()["add"] == [other]
        assert {a.agent_id: a.blacklisted for a in client.agents()} == {black: True, other: False}
    finally:
        restored = client.unblacklist(black)
    assert not restored.blacklisted
    task = client.wait(client.submit("add", 1, 2, agent_id=black), timeout=WAIT)
    assert task.status == "done" and task.agent_id == black and task.requested_agent_id == black
    assert sorted(client.procedures()["add"]) == [black, other]
    with pytest.raises(GatewayError) as e:
        client.blacklist("agent-does-not-exist")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_a_timed_out_call_frees_its_slot(client: Client) -> None:
    agent = agent_ids(client)[0]
    with pytest.raises(TaskFailed) as e:
        client.call("sleep", 5, timeout=0.3, agent_id=agent)
    assert "timed out" in e.value.error
    # The agent stops counting it as running (it reports its running tasks in echoes).
    poll(
        "the agent to report no running task",
        lambda: [a.running for a in client.agents() if a.agent_id == agent] == [0],
    )


def test_wait_gives_up_at_its_timeout(client: Client) -> None:
    task_id = client.submit("sleep", 30)
    try:
        poll("the task to run", lambda: client.get(task_id).status == "running")
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            client.wait(task_id, timeout=0.5)
        assert time.monotonic() - start < WAIT
        task = client.get(task_id, wait=0.2)
        assert not task.ended
    finally:
        client.cancel(task_id)


def test_an_opal_model_is_described_run_and_read_as_a_table(client: Client) -> None:
    schema = poll("the model's schema", lambda: (lambda s: s if s.kind == "opal" else None)(client.describe("trajectory")))
    assert isinstance(schema, ProcedureSchema)
    assert [p.name for p in schema.main] == ["size", "x", "y", "time"]
    size = schema.main[0]
    assert (size.type, size.default, size.required) == ("int", 100, False)
    assert [a.name for a in schema.algorithms] == ["genetic", "bellman"]
    xpart = schema.algorithms[1].parameters[0]
    assert xpart.partition is not None and (xpart.partition.start, xpart.partition.stop, xpart.partition.step) == (0, 100, 1)
    assert client.describe("add").kind == "builtin"

    # The seed's own typo is refused, naming the path and the near miss.
    with pytest.raises(GatewayError) as e:
        client.submit("trajectory", main={"size": 10}, algo={"genetic": {"population": 5}})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith("algo.genetic.population: unknown parameter")
    assert "poplulation" in e.value.message

    task_id = client.submit("trajectory", main={"size": 40}, algo={"bellman": {"xpart": 10, "ypart": 2.5}})
    seen = list(client.watch(task_id, timeout=WAIT))
    assert any(t.progress and 0 < t.progress.fraction < 1 for t in seen), [t.progress for t in seen]
    task = seen[-1]
    assert task.status == "done", task
    assert isinstance(task.table, Table) and task.result is None
    assert [(c.name, c.type) for c in task.table.columns] == [
        ("time", "datetime"), ("x", "float"), ("y", "float"), ("u", "float")]
    assert len(task.table.rows) == 41
    rows = task.table.to_dicts()
    # A float column holds floats, also where the number is integral (x starts at 20).
    assert rows[0]["time"] == "00:00" and isinstance(rows[0]["x"], float), rows[0]
    assert all(isinstance(r[c], float) for r in rows for c in ("x", "y", "u")), rows[:3]
    x = schema.main[1]
    assert (x.type, x.default) == ("float", 20.0) and isinstance(x.default, float), x
    assert abs(rows[-1]["x"] - 10) < 2.0, rows[-1]


def os_threads() -> int:
    """Threads of this process as the kernel counts them (Python's and grpc's own)."""
    return len(os.listdir("/proc/self/task"))


def test_on_done_follows_50_tasks_from_one_thread(client: Client, cluster) -> None:
    # 50 tasks that do not end until cancelled: four run, the rest stay queued.
    ids = [client.submit("sleep", 60) for _ in range(50)]
    try:
        py_before, os_before = threading.active_count(), os_threads()
        ran_in: set[str] = set()
        futures = [client.on_done(i, lambda t: ran_in.add(threading.current_thread().name)) for i in ids]
        py_pending, os_pending = threading.active_count(), os_threads()
        assert not any(f.done() for f in futures)
        # One watcher (and grpc's one polling thread), not one thread per task.
        assert py_pending - py_before <= 2, (py_before, py_pending, [t.name for t in threading.enumerate()])
        assert os_pending - os_before < 10, (os_before, os_pending)
    finally:
        for i in ids:
            client.cancel(i)
    ended = [f.result(timeout=WAIT) for f in futures]
    assert [t.task_id for t in ended] == ids
    assert {t.status for t in ended} == {"cancelled"}
    assert len(ran_in) == 1 and threading.current_thread().name not in ran_in, ran_in
    # A task the gateway does not know ends its future with the gateway's error.
    missing = str(uuid.uuid4())
    error = client.on_done(missing, lambda t: None).exception(timeout=WAIT)
    assert isinstance(error, GatewayError) and error.code == grpc.StatusCode.NOT_FOUND
    assert missing in error.message
    # With nothing left to follow, the watcher thread ends.
    poll("the watcher thread to end", lambda: threading.active_count() <= py_before)


def test_a_task_handle_gives_the_result_or_raises_task_failed(client: Client) -> None:
    handle = client.start("add", 2, 3)
    assert isinstance(handle, TaskHandle) and handle.id
    assert handle.result(timeout=WAIT) == 5
    assert handle.status() is TaskStatus.DONE
    assert client.task(handle.id).wait(timeout=WAIT).result == 5

    failing = client.start("div", 1, 0)
    with pytest.raises(TaskFailed) as e:
        failing.result(timeout=WAIT)
    assert e.value.status is TaskStatus.FAILED and e.value.error_code == 400
    assert "division by zero" in e.value.error and failing.id in str(e.value)
    assert isinstance(e.value, ArpcpError)

    slow = client.start("sleep", 30)
    try:
        with pytest.raises(TimeoutError) as t:
            slow.result(timeout=0.3)
        assert slow.id in str(t.value)
    finally:
        assert slow.cancel().status == "cancelled"
    with pytest.raises(TaskFailed) as e:
        slow.result(timeout=WAIT)
    assert e.value.status == "cancelled"


def test_status_is_an_enum_that_compares_as_its_string(client: Client) -> None:
    task = client.wait(client.submit("add", 1, 2), timeout=WAIT)
    assert task.status is TaskStatus.DONE
    assert task.status == "done" and "done" == task.status
    assert str(task.status) == "done" and f"{task.status}" == "done"
    assert task.status in FINAL_STATUSES and "done" in FINAL_STATUSES and "running" not in FINAL_STATUSES
    assert {"done": 1}[task.status] == 1
    assert TaskStatus("client_error") is TaskStatus.CLIENT_ERROR and TaskStatus.DONE.ended
    ids = {t.task_id for t in client.tasks(status=TaskStatus.DONE, procedure="add")}
    assert task.task_id in ids
    with pytest.raises(ValueError) as e:
        list(client.tasks(status="finished"))
    assert "finished" in str(e.value) and "client_error" in str(e.value)


def test_a_closed_client_raises_client_closed(client: Client, cluster) -> None:
    other = Client(cluster.grpc, timeout=10)
    slow = other.submit("sleep", 30)
    pending = other.on_done(slow, lambda t: None)
    other.close()
    assert other.closed
    # The callback's future ends with the same error rather than waiting forever.
    assert isinstance(pending.exception(timeout=WAIT), ClientClosed)
    for call in (
        lambda: other.submit("add", 1, 2),
        lambda: other.call("add", 1, 2),
        lambda: other.get(slow),
        lambda: other.wait(slow, timeout=1),
        lambda: other.start("add", 1, 2),
        lambda: list(other.watch(slow)),
        lambda: list(other.tasks()),
        lambda: other.agents(),
        lambda: other.on_done(slow, lambda t: None),
    ):
        with pytest.raises(ClientClosed) as e:
            call()
        assert "closed" in str(e.value) and "new Client" in str(e.value), str(e.value)
        assert isinstance(e.value, ArpcpError)
    client.cancel(slow)


class SilentPort:
    """A port that accepts connections and never says a word: a hung gateway, or
    another program on the port, as a client sees it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for c in self.held:
            c.close()
        self.sock.close()


def test_wait_on_a_gateway_that_never_answers_raises_timeout_error() -> None:
    # Its long poll had a deadline of the wait plus 10 s, and missing it was a
    # GatewayError (DEADLINE_EXCEEDED), not the TimeoutError the caller asked for.
    port = SilentPort()
    try:
        with Client(f"127.0.0.1:{port.port}", timeout=5) as c:
            with pytest.raises(TimeoutError, match="no answer from the gateway within 2"):
                c.wait(str(uuid.uuid4()), timeout=2)
            with pytest.raises(TimeoutError):
                c.result(str(uuid.uuid4()), timeout=1)
    finally:
        port.close()


def test_a_watch_on_a_gateway_that_stopped_ends(tmp_path) -> None:
    # A stopped gateway (SIGSTOP) answers no ping: the watch ends with UNAVAILABLE
    # (it waited for as long as the gateway was stopped, for ever). A gateway and an
    # agent of this test's own, so that the shared cluster is not stopped.
    binary = arpcp_bin()
    gw = start(binary, "gateway", ["gateway", "--grpc", "127.0.0.1:0", "--arpcp", "127.0.0.1:0",
                                   "--data-dir", str(tmp_path / "g"), "--echo-interval-ms", "200"], tmp_path)
    agent = None
    try:
        ready = gw.read_ready_line()
        agent = start(binary, "agent", ["agent", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "a"),
                                        "--controller", ready["arpcp"]], tmp_path)
        agent.read_ready_line()
        with Client(ready["grpc"], timeout=5) as c:
            poll("the agent alive", lambda: any(a.state == "alive" for a in c.agents()))
            task_id = c.submit("sleep", 60)
            seen = []
            gw.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(GatewayError) as e:
                    # Bounded all the same: without pings this waited for ever.
                    for t in c.watch(task_id, timeout=60):
                        seen.append(t)
                assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
            finally:
                gw.proc.send_signal(signal.SIGCONT)
    finally:
        if agent is not None:
            agent.stop()
        gw.stop()


def test_arguments_that_cannot_be_sent_are_refused_by_name(client: Client, cluster) -> None:
    # Integers travel as doubles: past 2**53 they would arrive as other numbers.
    assert client.call("add", 2**53 - 1, 0) == 2**53 - 1
    for big in (2**53, 2**53 + 1, -(2**63), 10**400):
        with pytest.raises(ValueError, match=r"cannot be sent exactly"):
            client.submit("add", big, 1)
    # Names and ids must be str: protobuf's own error named neither.
    with pytest.raises(TypeError, match="procedure must be a str, got int"):
        client.submit(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="task_id must be a str, got int"):
        client.get(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="agent_id must be a str or None, got int"):
        client.submit("add", 1, 2, agent_id=5)  # type: ignore[arg-type]
    # The CLI's form of the address works too.
    with Client(f"http://{cluster.grpc}", timeout=5) as c:
        assert c.call("add", 2, 2) == 4
    with pytest.raises(ValueError, match="https:// needs ca="):
        Client(f"https://{cluster.grpc}")
