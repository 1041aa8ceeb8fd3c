"""A blocking client of the arpcp gateway (gRPC service ``arpcp.v1.Gateway``).

Arguments and results are plain Python values (``None``, ``bool``, ``int``,
``float``, ``str``, ``list``, ``dict``); tasks and agents come back as dataclasses.
The asyncio client is :mod:`arpcp_client.aio`; both share :mod:`arpcp_client._common`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

import grpc

from . import _common as c
from ._common import (
    FINAL_STATUSES,
    Agent,
    Algorithm,
    ArpcpError,
    ClientClosed,
    Column,
    GatewayError,
    Parameter,
    Partition,
    PathOrPem,
    ProcedureSchema,
    Progress,
    Seconds,
    Table,
    Task,
    TaskFailed,
    TaskStatus,
    from_value,
    to_value,
)
from ._generated import gateway_pb2 as pb
from ._generated import gateway_pb2_grpc as pb_grpc

__all__ = [
    "FINAL_STATUSES",
    "MAX_ON_DONE_POLLS",
    "MAX_ON_DONE_TASKS",
    "Agent",
    "Algorithm",
    "ArpcpError",
    "Client",
    "ClientClosed",
    "Column",
    "GatewayError",
    "Parameter",
    "Partition",
    "ProcedureSchema",
    "Progress",
    "Table",
    "Task",
    "TaskFailed",
    "TaskHandle",
    "TaskStatus",
    "from_value",
    "to_value",
]

#: Tasks ``on_done`` follows at once, per client; one more raises :class:`ArpcpError`.
MAX_ON_DONE_TASKS = 10_000
#: GetResult long-polls the ``on_done`` watcher keeps open at once (gRPC streams on the
#: one connection); the other followed tasks wait their turn.
MAX_ON_DONE_POLLS = 32
# How long one watcher long-poll asks the gateway to wait: long while every followed
# task has a poll open, short when some wait their turn, so that they all get one.
_ON_DONE_LONG_WAIT = 60.0
_ON_DONE_SHORT_WAIT = 2.0

_R = TypeVar("_R")


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
        self.target = c._target(target, ca is not None)
        self.timeout = timeout
        creds, options = c._channel_setup(ca, cert, key, token, server_name)
        if creds is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, creds, options=options)
        self._stub = pb_grpc.GatewayStub(self._channel)
        self._closed = False
        self._watcher = _Watcher(self)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Closes the connection. Calls made afterwards raise :class:`ClientClosed`, and
        so do the futures of ``on_done`` callbacks still waiting."""
        self._closed = True
        self._watcher.stop()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClientClosed(what)

    def _error(self, e: grpc.RpcError, what: str) -> ArpcpError:
        # Closing the channel cancels the calls still running on it.
        if self._closed:
            return ClientClosed(what)
        return GatewayError.from_rpc(e)

    def _rpc(self, method: Callable[..., _R], request: Any, timeout: Optional[float] = None) -> _R:
        what = "call the gateway"
        self._check_open(what)
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise self._error(e, what) from None
        except ValueError:
            # grpc refuses a call on a channel closed meanwhile with a ValueError.
            if self._closed:
                raise ClientClosed(what) from None
            raise

    # Tasks.

    def submit(self, procedure: str, *args: Any, agent_id: Optional[str] = None, **kwargs: Any) -> str:
        """Submits a task running ``procedure(*args)`` or ``procedure(**kwargs)`` (not
        both) and returns its id once the gateway stored it. ``agent_id`` runs it on
        that agent; otherwise the gateway chooses."""
        req = c._submit_request(procedure, args, kwargs, agent_id)
        return self._rpc(self._stub.Submit, req).task_id

    def start(self, procedure: str, *args: Any, agent_id: Optional[str] = None, **kwargs: Any) -> "TaskHandle":
        """Like :meth:`submit`, but returns a :class:`TaskHandle`:
        ``client.start("add", 2, 3).result(timeout=30)`` is 5."""
        return TaskHandle(self, self.submit(procedure, *args, agent_id=agent_id, **kwargs))

    def task(self, task_id: str) -> "TaskHandle":
        """A :class:`TaskHandle` of a task submitted earlier (no call is made)."""
        return TaskHandle(self, task_id)

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
        req, deadline = c._call_request(procedure, args, kwargs, agent_id, timeout)
        resp = self._rpc(self._stub.Submit, req, timeout=deadline)
        return c._outcome(c._task(resp.task))

    def get(self, task_id: str, wait: Optional[Seconds] = None) -> Task:
        """Returns the task; with ``wait``, first blocks until it ends or that much
        time passes (at most 10 minutes)."""
        req, deadline = c._get_request(task_id, wait)
        return c._task(self._rpc(self._stub.GetResult, req, timeout=deadline))

    def wait(self, task_id: str, timeout: Optional[Seconds] = None) -> Task:
        """Blocks until the task ends and returns it. Raises :class:`TimeoutError`
        when it has not ended within ``timeout`` (default: wait as long as it takes)."""
        rounds = c._Deadline(task_id, timeout)
        while True:
            wait = rounds.next_wait()
            req, _ = c._get_request(task_id, wait)
            try:
                task = c._task(self._rpc(self._stub.GetResult, req, timeout=rounds.call_deadline(wait)))
            except GatewayError as e:
                raise rounds.timed_out(e) or e from None
            if rounds.ended(task):
                return task

    def result(self, task_id: str, timeout: Optional[Seconds] = None) -> Any:
        """Waits for the task like :meth:`wait` and returns its value (the result, or
        an Opal model's :class:`Table`); raises :class:`TaskFailed` when it ended
        otherwise, :class:`TimeoutError` when it did not end within ``timeout``."""
        return c._outcome(self.wait(task_id, timeout))

    def watch(self, task_id: str, timeout: Optional[Seconds] = None) -> Iterator[Task]:
        """Yields the task now and each time its status or progress changes; ends
        after it ends. With ``timeout``, raises :class:`GatewayError`
        (``DEADLINE_EXCEEDED``) when the task has not ended by then. Closing the
        iterator stops the stream."""
        what = f"watch task {task_id}"
        self._check_open(what)
        deadline = None if timeout is None else c._seconds(timeout)
        stream = self._stub.WatchTask(pb.WatchTaskRequest(task_id=c._text("task_id", task_id)), timeout=deadline)
        try:
            for t in stream:
                yield c._task(t)
        except grpc.RpcError as e:
            raise self._error(e, what) from None
        finally:
            stream.cancel()

    def on_done(
        self, task_id: str, callback: Callable[[Task], None]
    ) -> "concurrent.futures.Future[Task]":
        """Calls ``callback(task)`` once the task ended, and returns a future of the
        ended task; it holds the error instead when waiting or the callback failed.

        One background thread per client follows every task given here and runs the
        callbacks, one after the other: keep them short (or hand the work to your own
        executor). At most :data:`MAX_ON_DONE_TASKS` tasks are followed at once."""
        future: concurrent.futures.Future[Task] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        self._watcher.add(task_id, callback, future)
        return future

    def cancel(self, task_id: str) -> Task:
        """Stops the task and marks it cancelled; a task that already ended is left as it is."""
        return c._task(self._rpc(self._stub.CancelTask, pb.CancelTaskRequest(task_id=c._text("task_id", task_id))))

    def tasks(
        self,
        status: Optional[Union[str, TaskStatus]] = None,
        agent_id: Optional[str] = None,
        procedure: Optional[str] = None,
        page_size: int = 100,
    ) -> Iterator[Task]:
        """Yields the tasks, newest first, optionally only those in ``status`` (e.g.
        ``"done"`` or ``TaskStatus.DONE``), on ``agent_id`` or of ``procedure``;
        fetches ``page_size`` at a time."""
        req = c._list_request(status, agent_id, procedure, page_size)
        while True:
            resp = self._rpc(self._stub.ListTasks, req)
            for t in resp.tasks:
                yield c._task(t)
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    # Cluster.

    def agents(self) -> List[Agent]:
        """The agents the gateway knows, with their membership state."""
        return [c._agent(a) for a in self._rpc(self._stub.ListAgents, pb.ListAgentsRequest()).agents]

    def procedures(self) -> Dict[str, List[str]]:
        """Procedure name -> ids of the alive, non-blacklisted agents offering it."""
        return c._procedures(self._rpc(self._stub.ListProcedures, pb.ListProceduresRequest()))

    def describe(self, procedure: str) -> ProcedureSchema:
        """How to call ``procedure``: its kind and, for an Opal model, its parameters."""
        req = pb.DescribeProcedureRequest(procedure=procedure)
        return c._schema(self._rpc(self._stub.DescribeProcedure, req))

    def blacklist(self, agent_id: str) -> Agent:
        """Excludes the agent from task placement."""
        req = pb.BlacklistAgentRequest(agent_id=c._text("agent_id", agent_id))
        return c._agent(self._rpc(self._stub.BlacklistAgent, req))

    def unblacklist(self, agent_id: str) -> Agent:
        """Returns a blacklisted agent to task placement."""
        req = pb.UnblacklistAgentRequest(agent_id=c._text("agent_id", agent_id))
        return c._agent(self._rpc(self._stub.UnblacklistAgent, req))


class TaskHandle:
    """A submitted task, like Celery's ``AsyncResult``: ``handle.result(timeout=30)``
    is its value or raises :class:`TaskFailed`. From :meth:`Client.start` or
    :meth:`Client.task`; it holds only the id, so it is cheap and never stale."""

    def __init__(self, client: Client, task_id: str) -> None:
        self.client = client
        self.id = task_id

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.id == self.id and other.client is self.client

    def __hash__(self) -> int:
        return hash(self.id)

    def get(self, wait: Optional[Seconds] = None) -> Task:
        """The task now (see :meth:`Client.get`)."""
        return self.client.get(self.id, wait)

    def status(self) -> TaskStatus:
        """Its status now."""
        return self.get().status

    def wait(self, timeout: Optional[Seconds] = None) -> Task:
        """The ended task (see :meth:`Client.wait`)."""
        return self.client.wait(self.id, timeout)

    def result(self, timeout: Optional[Seconds] = None) -> Any:
        """Its value once it ended; :class:`TaskFailed` when it ended otherwise,
        :class:`TimeoutError` when it did not end within ``timeout``."""
        return self.client.result(self.id, timeout)

    def watch(self, timeout: Optional[Seconds] = None) -> Iterator[Task]:
        """Its changes until it ends (see :meth:`Client.watch`)."""
        return self.client.watch(self.id, timeout)

    def on_done(self, callback: Callable[[Task], None]) -> "concurrent.futures.Future[Task]":
        """``callback(task)`` once it ended (see :meth:`Client.on_done`)."""
        return self.client.on_done(self.id, callback)

    def cancel(self) -> Task:
        """Cancels it (see :meth:`Client.cancel`)."""
        return self.client.cancel(self.id)


_Waiter = Tuple[Callable[[Task], None], "concurrent.futures.Future[Task]"]
# What wakes the watcher thread: a finished long-poll (task id, its call), a task to
# follow (call None), or None to stop.
_Event = Optional[Tuple[str, Optional["grpc.Future[pb.Task]"]]]


class _Watcher:
    """Follows the tasks given to ``on_done`` from one thread, whatever their number:
    GetResult long-polls run as gRPC futures (at most ``MAX_ON_DONE_POLLS`` open, the
    others queued in turn), and their completions come back through one queue. The
    thread runs while some task is followed and ends when none is."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._waiters: Dict[str, List[_Waiter]] = {}
        self._turn: Deque[str] = collections.deque()
        self._polling = 0
        # At most one event per open poll, plus the stop marker.
        self._events: "queue.Queue[_Event]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def add(self, task_id: str, callback: Callable[[Task], None], future: "concurrent.futures.Future[Task]") -> None:
        with self._lock:
            if self._stopped:
                raise ClientClosed(f"follow task {task_id}")
            if task_id in self._waiters:
                self._waiters[task_id].append((callback, future))
                return
            if len(self._waiters) >= MAX_ON_DONE_TASKS:
                raise ArpcpError(
                    f"on_done follows at most {MAX_ON_DONE_TASKS} tasks at once (MAX_ON_DONE_TASKS); "
                    "wait for some of their futures before adding more"
                )
            self._waiters[task_id] = [(callback, future)]
            self._turn.append(task_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="arpcp-on-done", daemon=True)
                self._thread.start()
            else:
                self._events.put((task_id, None))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            waiters = [w for ws in self._waiters.values() for w in ws]
            self._waiters.clear()
            self._turn.clear()
            thread = self._thread
        for _, future in waiters:
            if not future.done():
                future.set_exception(ClientClosed("wait for the task"))
        if thread is not None:
            self._events.put(None)

    def _poll(self, task_id: str, wait: float) -> None:
        req, deadline = c._get_request(task_id, wait)
        try:
            call = self._client._stub.GetResult.future(req, timeout=deadline)
        except ValueError:  # the channel was closed meanwhile; stop() settles the futures
            return
        self._polling += 1
        call.add_done_callback(lambda f: self._events.put((task_id, f)))

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    self._thread = None
                    return
                wait = _ON_DONE_LONG_WAIT if len(self._waiters) <= MAX_ON_DONE_POLLS else _ON_DONE_SHORT_WAIT
                while self._turn and self._polling < MAX_ON_DONE_POLLS:
                    self._poll(self._turn.popleft(), wait)
                if not self._waiters and self._polling == 0:
                    self._thread = None
                    return
            event = self._events.get()
            if event is None:
                continue
            task_id, call = event
            if call is None:  # a new task to follow
                continue
            with self._lock:
                self._polling -= 1
            what = f"wait for task {task_id}"
            try:
                task = c._task(call.result())
            except grpc.RpcError as e:
                self._settle(task_id, error=self._client._error(e, what))
                continue
            except grpc.FutureCancelledError:  # only close() cancels these calls
                self._settle(task_id, error=ClientClosed(what))
                continue
            if task.ended:
                self._settle(task_id, task=task)
            else:
                with self._lock:
                    if task_id in self._waiters:
                        self._turn.append(task_id)

    def _settle(self, task_id: str, task: Optional[Task] = None, error: Optional[BaseException] = None) -> None:
        with self._lock:
            waiters = self._waiters.pop(task_id, [])
        for callback, future in waiters:
            if future.done():
                continue
            if task is None:
                future.set_exception(error or ArpcpError(f"task {task_id}: no answer"))
                continue
            try:
                callback(task)
            except BaseException as e:  # handed to the future's owner
                future.set_exception(e)
            else:
                future.set_result(task)
