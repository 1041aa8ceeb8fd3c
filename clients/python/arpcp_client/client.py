"""A small synchronous client of the arpcp gateway (gRPC service ``arpcp.v1.Gateway``).

Arguments and results are plain Python values (``None``, ``bool``, ``int``,
``float``, ``str``, ``list``, ``dict``); tasks and agents come back as dataclasses.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

try:
    from ._generated import gateway_pb2 as pb
    from ._generated import gateway_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - only without generated stubs
    raise ImportError(
        "arpcp_client's gRPC stubs are missing: run `python clients/python/generate.py` "
        "or install the package with `pip install ./clients/python`"
    ) from e

__all__ = [
    "FINAL_STATUSES",
    "Agent",
    "Algorithm",
    "Client",
    "Column",
    "GatewayError",
    "Parameter",
    "Partition",
    "ProcedureSchema",
    "Progress",
    "Table",
    "Task",
    "TaskFailed",
    "from_value",
    "to_value",
]

#: Seconds, or a timedelta.
Seconds = Union[float, int, _dt.timedelta]

#: Statuses a task does not leave.
FINAL_STATUSES = frozenset({"done", "failed", "client_error", "interrupted", "cancelled"})

# Integers up to this magnitude are exact in a double (protobuf numbers are doubles).
_MAX_EXACT_INT = 2**53
# The gateway's longest GetResult wait.
_MAX_WAIT = 600.0
# Extra time given to a gRPC call over the wait it asks the gateway for.
_MARGIN = 10.0

#: A file path, or PEM content as bytes.
PathOrPem = Union[str, "os.PathLike[str]", bytes]


def _pem(what: str, value: PathOrPem) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {os.fspath(value)!r}: {e.strerror}") from None


def _credentials(
    ca: PathOrPem, cert: Optional[PathOrPem], key: Optional[PathOrPem], token: Optional[str]
) -> grpc.ChannelCredentials:
    if key is not None and cert is None:
        raise ValueError("key= needs cert= (the client certificate it belongs to)")
    chain = private = None
    if cert is not None:
        chain = _pem("client certificate", cert)
        if key is None:
            if isinstance(cert, bytes):
                raise ValueError("cert= given as PEM bytes needs key= too")
            path = os.fspath(cert)
            key = path[:-4] + "-key.pem" if path.endswith(".pem") else path + "-key.pem"
        private = _pem("client key", key)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_pem("CA certificate", ca), private_key=private, certificate_chain=chain
    )
    if token is None:
        token = os.environ.get("ARPCP_TOKEN") or None
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


class GatewayError(Exception):
    """The gateway refused or failed a call; carries the gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        #: The gRPC status code, e.g. ``grpc.StatusCode.NOT_FOUND``.
        self.code = code
        #: The gateway's explanation.
        self.message = message

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "GatewayError":
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


class TaskFailed(Exception):
    """A task ended without a result (status other than ``done``)."""

    def __init__(self, task: "Task") -> None:
        super().__init__(f"task {task.task_id} ({task.procedure}) {task.status}: {task.error}")
        self.task = task
        #: The final status: "failed", "client_error", "interrupted" or "cancelled".
        self.status = task.status
        self.error = task.error
        #: The ARPCP status code of the error (204 wrong arguments, 400 execution error...).
        self.error_code = task.error_code


@dataclass(frozen=True)
class Progress:
    """How far a running task got, as its procedure reports it."""

    fraction: float
    comment: str


@dataclass(frozen=True)
class Column:
    """A column of an Opal result table."""

    name: str
    #: As the model declares it: "int", "float", "string", "bool", "period", "datetime".
    type: str
    comment: str = ""


@dataclass(frozen=True)
class Table:
    """An Opal model's result: typed columns and rows of cells."""

    columns: List[Column]
    rows: List[List[Any]]

    def to_dicts(self) -> List[Dict[str, Any]]:
        """One dict per row, keyed by column name."""
        names = [c.name for c in self.columns]
        return [dict(zip(names, row)) for row in self.rows]


@dataclass(frozen=True)
class Partition:
    """A range a parameter is swept over, with its step."""

    start: float
    stop: float
    step: float


@dataclass(frozen=True)
class Parameter:
    """One typed parameter of an Opal model."""

    name: str
    type: str
    choices: List[Any] = field(default_factory=list)
    default: Any = None
    partition: Optional[Partition] = None
    comment: str = ""
    #: No default: a call must give a value.
    required: bool = False


@dataclass(frozen=True)
class Algorithm:
    """One of an Opal model's algorithms (a call names exactly one)."""

    name: str
    parameters: List[Parameter]


@dataclass(frozen=True)
class ProcedureSchema:
    """How to call a procedure: its kind ("builtin", "command", "opal") and, for an
    Opal model, its parameters."""

    procedure: str
    kind: str
    main: List[Parameter]
    algorithms: List[Algorithm]
    agent_ids: List[str]


@dataclass(frozen=True)
class Task:
    """A task as the gateway stores it."""

    task_id: str
    procedure: str
    #: "queued", "dispatched", "running", "done", "failed", "client_error",
    #: "interrupted" or "cancelled".
    status: str
    args: List[Any] = field(default_factory=list)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    #: The procedure's value, when status is "done".
    result: Any = None
    #: Why it did not finish, when it did not ("" otherwise).
    error: str = ""
    #: The ARPCP status code of the error (0 when none).
    error_code: int = 0
    #: The agent it was placed on ("" until placed).
    agent_id: str = ""
    requested_agent_id: str = ""
    progress: Optional[Progress] = None
    created_at: Optional[_dt.datetime] = None
    started_at: Optional[_dt.datetime] = None
    finished_at: Optional[_dt.datetime] = None
    attempts: int = 0
    #: An Opal model's result table, when status is "done" (``result`` is then None).
    table: Optional[Table] = None

    @property
    def ended(self) -> bool:
        """Whether the task is in a final status."""
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class Agent:
    """An agent the gateway knows."""

    agent_id: str
    mac: str
    ip: str
    port: int
    hostname: str
    #: "alive", "suspect" or "gone".
    state: str
    misses: int
    last_seen: Optional[_dt.datetime]
    procedures: List[str]
    capacity: int
    running: int
    blacklisted: bool
    version: str
    #: host:port the gateway reaches it at.
    address: str


class Client:
    """A connection to an arpcp gateway.

    >>> with Client("127.0.0.1:50051") as c:
    ...     c.call("add", 2, 3)
    5
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = 30.0,
        ca: Optional[PathOrPem] = None,
        cert: Optional[PathOrPem] = None,
        key: Optional[PathOrPem] = None,
        token: Optional[str] = None,
        server_name: Optional[str] = None,
    ) -> None:
        """``target`` is the gateway's gRPC address (``host:port``); ``timeout`` is the
        deadline, in seconds, of calls that do not wait for tasks.

        A gateway started with ``--tls-dir`` speaks TLS and wants credentials: ``ca``
        is the cluster CA (``ca.pem``), then either ``cert`` (a client certificate
        from ``arpcp ca issue client NAME --role ...``; ``key`` defaults to the
        ``-key.pem`` file beside it) or ``token`` (from ``arpcp token create``;
        defaults to the environment variable ``ARPCP_TOKEN``). ``server_name`` is the
        name the gateway's certificate is checked against when it differs from the
        host in ``target``. Each argument is a file path or the PEM itself (bytes)."""
        self.target = target
        self.timeout = timeout
        if ca is None:
            if cert is not None or key is not None or token is not None:
                raise ValueError(
                    "cert, key and token are sent only over TLS: give ca= (the cluster's ca.pem) too"
                )
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(
                target,
                _credentials(ca, cert, key, token),
                options=[("grpc.ssl_target_name_override", server_name)] if server_name else [],
            )
        self._stub = pb_grpc.GatewayStub(self._channel)

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rpc(self, method: Callable[..., Any], request: Any, timeout: Optional[float] = None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise GatewayError.from_rpc(e) from None

    # Tasks.

    def submit(self, procedure: str, *args: Any, agent_id: Optional[str] = None, **kwargs: Any) -> str:
        """Submits a task running ``procedure(*args)`` or ``procedure(**kwargs)`` (not
        both) and returns its id once the gateway stored it. ``agent_id`` runs it on
        that agent; otherwise the gateway chooses."""
        req = _submit_request(procedure, args, kwargs, agent_id)
        return self._rpc(self._stub.Submit, req).task_id

    def call(
        self,
        procedure: str,
        *args: Any,
        timeout: Optional[Seconds] = None,
        agent_id: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """Runs ``procedure`` synchronously and returns its result. Raises
        :class:`TaskFailed` when it ends otherwise. ``timeout`` bounds the run (the
        gateway's default is 60 s)."""
        req = _submit_request(procedure, args, kwargs, agent_id)
        req.sync = True
        limit = 60.0
        if timeout is not None:
            req.timeout.CopyFrom(_duration(timeout))
            limit = _seconds(timeout)
        resp = self._rpc(self._stub.Submit, req, timeout=limit + _MARGIN)
        task = _task(resp.task)
        if task.status != "done":
            raise TaskFailed(task)
        return task.result

    def get(self, task_id: str, wait: Optional[Seconds] = None) -> Task:
        """Returns the task; with ``wait``, first blocks until it ends or that much
        time passes (at most 10 minutes)."""
        req = pb.GetResultRequest(task_id=task_id)
        deadline = None
        if wait is not None:
            req.wait.CopyFrom(_duration(wait))
            deadline = _seconds(wait) + _MARGIN
        return _task(self._rpc(self._stub.GetResult, req, timeout=deadline))

    def wait(self, task_id: str, timeout: Optional[Seconds] = None) -> Task:
        """Blocks until the task ends and returns it. Raises :class:`TimeoutError`
        when it has not ended within ``timeout`` (default: wait as long as it takes)."""
        end = None if timeout is None else time.monotonic() + _seconds(timeout)
        while True:
            left = _MAX_WAIT if end is None else max(0.0, end - time.monotonic())
            task = self.get(task_id, wait=min(left, _MAX_WAIT))
            if task.ended:
                return task
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"task {task_id} still {task.status} after {_seconds(timeout or 0)} s")

    def watch(self, task_id: str, timeout: Optional[Seconds] = None) -> Iterator[Task]:
        """Yields the task now and each time its status or progress changes; ends
        after it ends. With ``timeout``, raises :class:`GatewayError`
        (``DEADLINE_EXCEEDED``) when the task has not ended by then. Closing the
        iterator stops the stream."""
        deadline = None if timeout is None else _seconds(timeout)
        stream = self._stub.WatchTask(pb.WatchTaskRequest(task_id=task_id), timeout=deadline)
        try:
            for t in stream:
                yield _task(t)
        except grpc.RpcError as e:
            raise GatewayError.from_rpc(e) from None
        finally:
            stream.cancel()

    def on_done(
        self, task_id: str, callback: Callable[[Task], None]
    ) -> "concurrent.futures.Future[Task]":
        """Calls ``callback(task)`` from a background thread once the task ended.
        Returns a future of the ended task; it holds the error instead when waiting
        or the callback failed."""
        future: concurrent.futures.Future[Task] = concurrent.futures.Future()

        def run() -> None:
            try:
                task = self.wait(task_id)
                callback(task)
            except BaseException as e:  # handed to the future's owner
                future.set_exception(e)
            else:
                future.set_result(task)

        future.set_running_or_notify_cancel()
        threading.Thread(target=run, name=f"arpcp-on-done-{task_id}", daemon=True).start()
        return future

    def cancel(self, task_id: str) -> Task:
        """Stops the task and marks it cancelled; a task that already ended is left as it is."""
        return _task(self._rpc(self._stub.CancelTask, pb.CancelTaskRequest(task_id=task_id)))

    def tasks(
        self,
        status: Optional[str] = None,
        agent_id: Optional[str] = None,
        procedure: Optional[str] = None,
        page_size: int = 100,
    ) -> Iterator[Task]:
        """Yields the tasks, newest first, optionally only those in ``status`` (e.g.
        "done"), on ``agent_id`` or of ``procedure``; fetches ``page_size`` at a time."""
        req = pb.ListTasksRequest(
            status=_status_number(status) if status else 0,
            agent_id=agent_id or "",
            procedure=procedure or "",
            page_size=page_size,
        )
        while True:
            resp = self._rpc(self._stub.ListTasks, req)
            for t in resp.tasks:
                yield _task(t)
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    # Cluster.

    def agents(self) -> List[Agent]:
        """The agents the gateway knows, with their membership state."""
        return [_agent(a) for a in self._rpc(self._stub.ListAgents, pb.ListAgentsRequest()).agents]

    def procedures(self) -> Dict[str, List[str]]:
        """Procedure name -> ids of the alive, non-blacklisted agents offering it."""
        resp = self._rpc(self._stub.ListProcedures, pb.ListProceduresRequest())
        return {p.name: list(p.agent_ids) for p in resp.procedures}

    def describe(self, procedure: str) -> ProcedureSchema:
        """How to call ``procedure``: its kind and, for an Opal model, its parameters."""
        s = self._rpc(self._stub.DescribeProcedure, pb.DescribeProcedureRequest(procedure=procedure))
        return ProcedureSchema(
            procedure=s.procedure,
            kind=pb.ProcedureKind.Name(s.kind).removeprefix("PROCEDURE_KIND_").lower(),
            main=[_parameter(p) for p in s.main],
            algorithms=[Algorithm(a.name, [_parameter(p) for p in a.parameters]) for a in s.algorithms],
            agent_ids=list(s.agent_ids),
        )

    def blacklist(self, agent_id: str) -> Agent:
        """Excludes the agent from task placement."""
        return _agent(self._rpc(self._stub.BlacklistAgent, pb.BlacklistAgentRequest(agent_id=agent_id)))

    def unblacklist(self, agent_id: str) -> Agent:
        """Returns a blacklisted agent to task placement."""
        return _agent(
            self._rpc(self._stub.UnblacklistAgent, pb.UnblacklistAgentRequest(agent_id=agent_id))
        )


# Conversions.


def _seconds(s: Seconds) -> float:
    return s.total_seconds() if isinstance(s, _dt.timedelta) else float(s)


def _duration(s: Seconds) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    secs = _seconds(s)
    d.seconds = int(secs)
    d.nanos = int(round((secs - int(secs)) * 1e9))
    return d


def _submit_request(
    procedure: str, args: tuple, kwargs: Dict[str, Any], agent_id: Optional[str]
) -> pb.SubmitRequest:
    req = pb.SubmitRequest(procedure=procedure, agent_id=agent_id or "")
    req.args.extend(to_value(a) for a in args)
    if kwargs:
        req.kwargs.CopyFrom(_struct(kwargs))
    return req


def to_value(v: Any) -> struct_pb2.Value:
    """A Python value as a ``google.protobuf.Value``."""
    out = struct_pb2.Value()
    if v is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{v} is not a finite number")
        out.number_value = float(v)
    elif isinstance(v, str):
        out.string_value = v
    elif isinstance(v, dict):
        out.struct_value.CopyFrom(_struct(v))
    elif isinstance(v, (list, tuple)):
        out.list_value.values.extend(to_value(x) for x in v)
    else:
        raise TypeError(f"cannot send {type(v).__name__} values (use JSON-like values)")
    return out


def _struct(d: Dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    for k, v in d.items():
        if not isinstance(k, str):
            raise TypeError(f"object keys must be strings, got {k!r}")
        s.fields[k].CopyFrom(to_value(v))
    return s


def from_value(v: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as a Python value; integral numbers become ``int``."""
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "bool_value":
        return v.bool_value
    if kind == "number_value":
        n = v.number_value
        if math.isfinite(n) and n == int(n) and abs(n) <= _MAX_EXACT_INT:
            return int(n)
        return n
    if kind == "string_value":
        return v.string_value
    if kind == "struct_value":
        return {k: from_value(x) for k, x in v.struct_value.fields.items()}
    return [from_value(x) for x in v.list_value.values]


def _time(msg: Any, name: str) -> Optional[_dt.datetime]:
    if not msg.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=_dt.timezone.utc)


def _status_name(n: int) -> str:
    return pb.TaskStatus.Name(n).removeprefix("TASK_STATUS_").lower()


def _status_number(name: str) -> int:
    try:
        return pb.TaskStatus.Value("TASK_STATUS_" + name.upper())
    except ValueError:
        known = ", ".join(sorted(FINAL_STATUSES | {"queued", "dispatched", "running"}))
        raise ValueError(f"unknown task status {name!r} (one of {known})") from None


def _task(t: pb.Task) -> Task:
    return Task(
        task_id=t.task_id,
        procedure=t.procedure,
        status=_status_name(t.status),
        args=[from_value(a) for a in t.args],
        kwargs={k: from_value(v) for k, v in t.kwargs.fields.items()},
        result=from_value(t.result) if t.HasField("result") else None,
        error=t.error,
        error_code=t.error_code,
        agent_id=t.agent_id,
        requested_agent_id=t.requested_agent_id,
        progress=Progress(t.progress.fraction, t.progress.comment) if t.HasField("progress") else None,
        created_at=_time(t, "created_at"),
        started_at=_time(t, "started_at"),
        finished_at=_time(t, "finished_at"),
        attempts=t.attempts,
        table=_table(t.table) if t.HasField("table") else None,
    )


def _table(t: pb.ResultTable) -> Table:
    return Table(
        columns=[Column(c.name, c.type, c.comment) for c in t.columns],
        rows=[[from_value(v) for v in r.cells] for r in t.rows],
    )


def _parameter(p: pb.Parameter) -> Parameter:
    return Parameter(
        name=p.name,
        type=p.type,
        choices=[from_value(v) for v in p.choices],
        default=from_value(p.default_value) if p.HasField("default_value") else None,
        partition=(
            Partition(getattr(p.partition, "from"), p.partition.to, p.partition.step)
            if p.HasField("partition")
            else None
        ),
        comment=p.comment,
        required=p.required,
    )


def _agent(a: pb.Agent) -> Agent:
    return Agent(
        agent_id=a.agent_id,
        mac=a.mac,
        ip=a.ip,
        port=a.port,
        hostname=a.hostname,
        state=pb.AgentState.Name(a.state).removeprefix("AGENT_STATE_").lower(),
        misses=a.misses,
        last_seen=_time(a, "last_seen"),
        procedures=list(a.procedures),
        capacity=a.capacity,
        running=a.running,
        blacklisted=a.blacklisted,
        version=a.version,
        address=a.address,
    )
