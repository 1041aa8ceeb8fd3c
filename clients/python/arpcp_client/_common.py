"""What the blocking and the asyncio clients share: the dataclasses, errors and
status enum users see, the conversions between Python values and protobuf, the
requests, and the TLS credentials. Public names are re-exported by ``arpcp_client``."""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Union

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

try:
    from ._generated import gateway_pb2 as pb
except ImportError as e:  # pragma: no cover - only without generated stubs
    raise ImportError(
        "arpcp_client's gRPC stubs are missing: run `python clients/python/generate.py` "
        "or install the package with `pip install ./clients/python`"
    ) from e

#: Seconds, or a timedelta.
Seconds = Union[float, int, _dt.timedelta]



class TaskStatus(str, Enum):
    """Where a task is. A ``str``, so ``task.status == "done"`` and ``print(task.status)``
    (``done``) work as with plain strings."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CLIENT_ERROR = "client_error"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"

    # Hash and print as the string, so a plain "done" finds TaskStatus.DONE in a set or
    # dict and f-strings show the value on every Python version.
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def ended(self) -> bool:
        """Whether a task does not leave this status."""
        return self in FINAL_STATUSES


#: Statuses a task does not leave.
FINAL_STATUSES: FrozenSet[TaskStatus] = frozenset(
    {
        TaskStatus.DONE,
        TaskStatus.FAILED,
        TaskStatus.CLIENT_ERROR,
        TaskStatus.INTERRUPTED,
        TaskStatus.CANCELLED,
    }
)

# Integers up to this magnitude are exact in a double (protobuf numbers are doubles).
_MAX_EXACT_INT = 2**53
# The gateway's longest GetResult wait.
_MAX_WAIT = 600.0
# The gateway's run limit of a synchronous Submit that gives no timeout.
_DEFAULT_SYNC_TIMEOUT = 60.0
# Extra time given to a gRPC call over the wait it asks the gateway for.
_MARGIN = 10.0
# How far past the caller's own timeout a wait's last call may run: the gateway
# answers at the end of the wait it was asked for, so this covers the way back only.
_END_SLACK = 1.0
# HTTP/2 pings on a connection with calls open (a wait, a watch): a gateway that
# stopped answering fails them after _KEEPALIVE_MS + _KEEPALIVE_TIMEOUT_MS instead
# of never. Pings go on without data (max_pings_without_data 0): a long poll sends
# none for minutes.
_KEEPALIVE_MS = 10_000
_KEEPALIVE_TIMEOUT_MS = 5_000
_CHANNEL_OPTIONS: List[Tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # What grpc-core waits for a ping's answer (a minute by default; it wins over
    # keepalive_timeout_ms).
    ("grpc.http2.ping_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
]

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


class ArpcpError(Exception):
    """Base of the errors this client raises (besides ``ValueError``/``TypeError`` for
    bad arguments and ``TimeoutError`` for waits that ran out)."""


class ClientClosed(ArpcpError):
    """A call on a client that was closed (``close()`` or the end of its ``with`` block)."""

    def __init__(self, what: str = "call") -> None:
        super().__init__(
            f"cannot {what}: this arpcp client is closed; create a new Client to reach the gateway again"
        )


class GatewayError(ArpcpError):
    """The gateway refused or failed a call; carries the gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        #: The gRPC status code, e.g. ``grpc.StatusCode.NOT_FOUND``.
        self.code = code
        #: The gateway's explanation.
        self.message = message

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "GatewayError":
        # Both grpc's call errors and grpc.aio's AioRpcError have code() and details();
        # neither is declared on grpc.RpcError itself.
        code = getattr(e, "code", None)
        details = getattr(e, "details", None)
        status = code() if callable(code) else None
        text = details() if callable(details) else str(e)
        return cls(
            status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
            text if isinstance(text, str) else "",
        )


class TaskFailed(ArpcpError):
    """A task ended without a result (status other than ``done``)."""

    def __init__(self, task: "Task") -> None:
        super().__init__(f"task {task.task_id} ({task.procedure}) {task.status}: {task.error}")
        self.task = task
        #: The final status: failed, client_error, interrupted or cancelled.
        self.status: TaskStatus = task.status
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
    status: TaskStatus
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
    #: Who submitted it, on a gateway with TLS: ``cert:NAME`` or ``token:NAME`` ("" otherwise).
    owner: str = ""

    @property
    def ended(self) -> bool:
        """Whether the task is in a final status."""
        return self.status in FINAL_STATUSES

    @property
    def value(self) -> Any:
        """What the task produced: its result table for an Opal model, else ``result``."""
        return self.table if self.table is not None else self.result


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


# Conversions.


def _seconds(s: Seconds) -> float:
    return s.total_seconds() if isinstance(s, _dt.timedelta) else float(s)


def _duration(s: Seconds) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    secs = _seconds(s)
    d.seconds = int(secs)
    d.nanos = int(round((secs - int(secs)) * 1e9))
    return d


def _text(name: str, value: Any, optional: bool = False) -> str:
    """A name or id argument, which must be a ``str`` (protobuf's own error for
    another type names neither the argument nor the type)."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        wanted = "a str or None" if optional else "a str"
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}")
    return value


def _submit_request(
    procedure: str, args: Tuple[Any, ...], kwargs: Dict[str, Any], agent_id: Optional[str]
) -> pb.SubmitRequest:
    req = pb.SubmitRequest(
        procedure=_text("procedure", procedure), agent_id=_text("agent_id", agent_id, optional=True)
    )
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
        # A protobuf number is a double: an int past 2**53 would arrive as another
        # number, silently.
        if isinstance(v, int) and abs(v) >= _MAX_EXACT_INT:
            raise ValueError(
                f"{v} cannot be sent exactly: integers travel as JSON numbers (doubles), "
                f"exact within ±(2**53 - 1) = {_MAX_EXACT_INT - 1}; send it as a str"
            )
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


def _status(n: int) -> TaskStatus:
    return TaskStatus(_enum_name(pb.TaskStatus.Name(n), "TASK_STATUS_"))


def _status_name(status: Union[str, TaskStatus]) -> str:
    """The protobuf name of a status given as ``"done"`` or ``TaskStatus.DONE``."""
    try:
        return "TASK_STATUS_" + TaskStatus(status).name
    except ValueError:
        known = ", ".join(s.value for s in TaskStatus)
        raise ValueError(f"unknown task status {str(status)!r} (one of {known})") from None


def _enum_name(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _task(t: pb.Task) -> Task:
    return Task(
        task_id=t.task_id,
        procedure=t.procedure,
        status=_status(t.status),
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
        owner=t.owner,
        table=_table(t.table) if t.HasField("table") else None,
    )


def _typed(opal_type: str, v: Any) -> Any:
    """A value as its Opal type says: a ``float`` column or parameter holds floats,
    also where the number is integral (``from_value`` makes those ints)."""
    if opal_type == "float" and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _table(t: pb.ResultTable) -> Table:
    types = [c.type for c in t.columns]
    return Table(
        columns=[Column(c.name, c.type, c.comment) for c in t.columns],
        rows=[
            [_typed(types[i] if i < len(types) else "", from_value(v)) for i, v in enumerate(r.cells)]
            for r in t.rows
        ],
    )


def _parameter(p: pb.Parameter) -> Parameter:
    return Parameter(
        name=p.name,
        type=p.type,
        choices=[_typed(p.type, from_value(v)) for v in p.choices],
        default=_typed(p.type, from_value(p.default_value)) if p.HasField("default_value") else None,
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
        state=_enum_name(pb.AgentState.Name(a.state), "AGENT_STATE_"),
        misses=a.misses,
        last_seen=_time(a, "last_seen"),
        procedures=list(a.procedures),
        capacity=a.capacity,
        running=a.running,
        blacklisted=a.blacklisted,
        version=a.version,
        address=a.address,
    )


def _schema(s: pb.ProcedureSchema) -> ProcedureSchema:
    return ProcedureSchema(
        procedure=s.procedure,
        kind=_enum_name(pb.ProcedureKind.Name(s.kind), "PROCEDURE_KIND_"),
        main=[_parameter(p) for p in s.main],
        algorithms=[Algorithm(a.name, [_parameter(p) for p in a.parameters]) for a in s.algorithms],
        agent_ids=list(s.agent_ids),
    )


def _procedures(resp: pb.ListProceduresResponse) -> Dict[str, List[str]]:
    return {p.name: list(p.agent_ids) for p in resp.procedures}


# Requests and the rules around them, the same for the blocking and the asyncio client.


def _call_request(
    procedure: str,
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    agent_id: Optional[str],
    timeout: Optional[Seconds],
) -> Tuple[pb.SubmitRequest, float]:
    """A synchronous Submit and the gRPC deadline it needs (its run, plus a margin)."""
    req = _submit_request(procedure, args, kwargs, agent_id)
    req.sync = True
    limit = _DEFAULT_SYNC_TIMEOUT
    if timeout is not None:
        req.timeout.CopyFrom(_duration(timeout))
        limit = _seconds(timeout)
    return req, limit + _MARGIN


def _get_request(task_id: str, wait: Optional[Seconds]) -> Tuple[pb.GetResultRequest, Optional[float]]:
    """A GetResult and its gRPC deadline (None: the client's default)."""
    req = pb.GetResultRequest(task_id=_text("task_id", task_id))
    if wait is None:
        return req, None
    req.wait.CopyFrom(_duration(wait))
    return req, _seconds(wait) + _MARGIN


def _list_request(
    status: Optional[Union[str, TaskStatus]],
    agent_id: Optional[str],
    procedure: Optional[str],
    page_size: int,
) -> pb.ListTasksRequest:
    return pb.ListTasksRequest(
        status=_status_name(status) if status else "TASK_STATUS_UNSPECIFIED",
        agent_id=agent_id or "",
        procedure=procedure or "",
        page_size=page_size,
    )


def _outcome(task: Task) -> Any:
    """The value of an ended task, or :class:`TaskFailed`."""
    if task.status != TaskStatus.DONE:
        raise TaskFailed(task)
    return task.value


class _Deadline:
    """The rounds of GetResult long-polls that wait for a task to end: each asks for at
    most the gateway's longest wait, and the last ends at the caller's timeout."""

    def __init__(self, task_id: str, timeout: Optional[Seconds]) -> None:
        self.task_id = task_id
        self.timeout = None if timeout is None else _seconds(timeout)
        self.end = None if self.timeout is None else time.monotonic() + self.timeout

    def next_wait(self) -> float:
        left = _MAX_WAIT if self.end is None else max(0.0, self.end - time.monotonic())
        return min(left, _MAX_WAIT)

    def call_deadline(self, wait: float) -> float:
        """The gRPC deadline of a round asking for ``wait``: the wait and a margin,
        but not much past the caller's timeout (a gateway that does not answer must
        not hold the caller longer than it asked)."""
        deadline = wait + _MARGIN
        if self.end is not None:
            deadline = min(deadline, max(0.0, self.end - time.monotonic()) + _END_SLACK)
        return deadline

    def timed_out(self, e: "GatewayError") -> Optional[TimeoutError]:
        """The :class:`TimeoutError` a round's missed gRPC deadline means, once the
        caller's time is up."""
        if (
            self.end is not None
            and time.monotonic() >= self.end
            and e.code == grpc.StatusCode.DEADLINE_EXCEEDED
        ):
            return TimeoutError(
                f"task {self.task_id}: no answer from the gateway within {self.timeout} s"
            )
        return None

    def ended(self, task: Task) -> bool:
        """Whether ``task`` ended; :class:`TimeoutError` once the time is up without it."""
        if task.ended:
            return True
        if self.end is not None and time.monotonic() >= self.end:
            raise TimeoutError(f"task {self.task_id} still {task.status} after {self.timeout} s")
        return False


def _channel_setup(
    ca: Optional[PathOrPem],
    cert: Optional[PathOrPem],
    key: Optional[PathOrPem],
    token: Optional[str],
    server_name: Optional[str],
) -> Tuple[Optional[grpc.ChannelCredentials], List[Tuple[str, Any]]]:
    """The credentials (None: plaintext) and channel options of a client's arguments."""
    if ca is None:
        if cert is not None or key is not None or token is not None:
            raise ValueError(
                "cert, key and token are sent only over TLS: give ca= (the cluster's ca.pem) too"
            )
        return None, list(_CHANNEL_OPTIONS)
    options: List[Tuple[str, Any]] = list(_CHANNEL_OPTIONS) + (
        [("grpc.ssl_target_name_override", server_name)] if server_name else []
    )
    return _credentials(ca, cert, key, token), options


def _target(target: Any, tls: bool) -> str:
    """The gateway's address as gRPC takes it: ``host:port``. The CLI's and
    ``ARPCP_GATEWAY``'s ``http://host:port`` is taken too (``https://`` with ``ca=``)."""
    text = _text("target", target)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    if scheme == "http" or (scheme == "https" and tls):
        return rest.rstrip("/")
    if scheme == "https":
        raise ValueError(f"{text}: https:// needs ca= (the cluster's ca.pem)")
    raise ValueError(f"{text}: expected host:port (or http://host:port)")
