"""An asyncio client of the arpcp gateway, on ``grpc.aio``: the blocking client's
calls as coroutines, with the same arguments, dataclasses and errors.

Waiting for a task is an awaited gRPC call, not a thread, so ``asyncio.gather`` over
many tasks costs one coroutine each::

    async with Client("127.0.0.1:50051") as client:
        tasks = [await client.start("add", i, 1) for i in range(50)]
        print(await asyncio.gather(*(t.result(timeout=30) for t in tasks)))

Create the client inside a running event loop (in a coroutine): a ``grpc.aio``
channel belongs to the loop it was made in.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Dict, List, Optional, TypeVar, Union, cast

import grpc
import grpc.aio

from . import _common as c
from ._common import (
    Agent,
    ArpcpError,
    ClientClosed,
    GatewayError,
    PathOrPem,
    ProcedureSchema,
    Seconds,
    Task,
    TaskStatus,
)
from ._generated import gateway_pb2 as pb
from ._generated import gateway_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ._generated.gateway_pb2_grpc import GatewayAsyncStub

__all__ = ["Client", "TaskHandle"]

_R = TypeVar("_R")


class Client:
    """An asyncio connection to an arpcp gateway; the same arguments as
    :class:`arpcp_client.Client` (TLS included)."""

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
        self.target = c._target(target, ca is not None)
        self.timeout = timeout
        creds, options = c._channel_setup(ca, cert, key, token, server_name)
        if creds is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, creds, options=options)
        # The generated stub takes a grpc.aio channel as well; its calls are then awaitable.
        self._stub = cast("GatewayAsyncStub", pb_grpc.GatewayStub(self._channel))
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def close(self) -> None:
        """Closes the connection; calls still running end with :class:`ClientClosed`,
        and so do calls made afterwards."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClientClosed(what)

    def _error(self, e: grpc.RpcError, what: str) -> ArpcpError:
        if self._closed:
            return ClientClosed(what)
        return GatewayError.from_rpc(e)

    def _closed_meanwhile(self, what: str) -> Optional[ClientClosed]:
        """What a ``CancelledError`` means: :class:`ClientClosed` when :meth:`close`
        cancelled the call (grpc.aio cancels a closed channel's calls), ``None`` when
        the caller's own task is being cancelled (that must go on)."""
        task = asyncio.current_task()
        # Task.cancelling() is Python 3.11's; on 3.10 a close counts as the cause.
        count = getattr(task, "cancelling", None)
        cancelling = callable(count) and count() > 0
        return ClientClosed(what) if self._closed and not cancelling else None

    async def _rpc(self, call: "Awaitable[_R]", what: str = "call the gateway") -> _R:
        try:
            return await call
        except grpc.RpcError as e:
            raise self._error(e, what) from None
        except asyncio.CancelledError:
            closed = self._closed_meanwhile(what)
            if closed is None:
                raise
            raise closed from None

    def _timeout(self, timeout: Optional[float]) -> float:
        return self.timeout if timeout is None else timeout

    # Tasks.

    async def submit(self, procedure: str, *args: Any, agent_id: Optional[str] = None, **kwargs: Any) -> str:
        """Submits a task and returns its id once the gateway stored it (see
        :meth:`arpcp_client.Client.submit`)."""
        self._check_open("call the gateway")
        req = c._submit_request(procedure, args, kwargs, agent_id)
        return (await self._rpc(self._stub.Submit(req, timeout=self.timeout))).task_id

    async def start(
        self, procedure: str, *args: Any, agent_id: Optional[str] = None, **kwargs: Any
    ) -> "TaskHandle":
        """Like :meth:`submit`, but returns a :class:`TaskHandle`:
        ``await (await client.start("add", 2, 3)).result(timeout=30)`` is 5."""
        return TaskHandle(self, await self.submit(procedure, *args, agent_id=agent_id, **kwargs))

    def task(self, task_id: str) -> "TaskHandle":
        """A :class:`TaskHandle` of a task submitted earlier (no call is made)."""
        return TaskHandle(self, task_id)

    async def call(
        self,
        procedure: str,
        *args: Any,
        timeout: Optional[Seconds] = None,
        agent_id: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """Runs ``procedure`` synchronously: its result, or :class:`TaskFailed`."""
        self._check_open("call the gateway")
        req, deadline = c._call_request(procedure, args, kwargs, agent_id, timeout)
        resp = await self._rpc(self._stub.Submit(req, timeout=deadline))
        return c._outcome(c._task(resp.task))

    async def get(self, task_id: str, wait: Optional[Seconds] = None) -> Task:
        """The task; with ``wait``, once it ended or that much time passed."""
        self._check_open("call the gateway")
        req, deadline = c._get_request(task_id, wait)
        return c._task(await self._rpc(self._stub.GetResult(req, timeout=self._timeout(deadline))))

    async def wait(self, task_id: str, timeout: Optional[Seconds] = None) -> Task:
        """The ended task; :class:`TimeoutError` when it did not end within ``timeout``."""
        rounds = c._Deadline(task_id, timeout)
        while True:
            self._check_open("call the gateway")
            wait = rounds.next_wait()
            req, _ = c._get_request(task_id, wait)
            call = self._stub.GetResult(req, timeout=rounds.call_deadline(wait))
            try:
                task = c._task(await self._rpc(call))
            except GatewayError as e:
                raise rounds.timed_out(e) or e from None
            if rounds.ended(task):
                return task

    async def result(self, task_id: str, timeout: Optional[Seconds] = None) -> Any:
        """The task's value once it ended (an Opal model's :class:`Table`, else its
        result); :class:`TaskFailed` when it ended otherwise."""
        return c._outcome(await self.wait(task_id, timeout))

    async def watch(self, task_id: str, timeout: Optional[Seconds] = None) -> AsyncIterator[Task]:
        """``async for task in client.watch(id)``: the task now and at each change,
        until it ends. With ``timeout``, :class:`GatewayError` (``DEADLINE_EXCEEDED``)
        when it has not ended by then. Leaving the loop stops the stream."""
        what = f"watch task {task_id}"
        self._check_open(what)
        deadline = None if timeout is None else c._seconds(timeout)
        stream = self._stub.WatchTask(pb.WatchTaskRequest(task_id=c._text("task_id", task_id)), timeout=deadline)
        try:
            async for t in stream:
                yield c._task(t)
        except grpc.RpcError as e:
            raise self._error(e, what) from None
        except asyncio.CancelledError:
            closed = self._closed_meanwhile(what)
            if closed is None:
                raise
            raise closed from None
        finally:
            stream.cancel()

    async def cancel(self, task_id: str) -> Task:
        """Cancels the task; one that already ended is left as it is."""
        self._check_open("call the gateway")
        req = pb.CancelTaskRequest(task_id=c._text("task_id", task_id))
        return c._task(await self._rpc(self._stub.CancelTask(req, timeout=self.timeout)))

    async def tasks(
        self,
        status: Optional[Union[str, TaskStatus]] = None,
        agent_id: Optional[str] = None,
        procedure: Optional[str] = None,
        page_size: int = 100,
    ) -> AsyncIterator[Task]:
        """``async for task in client.tasks(...)``: every matching task, newest first,
        fetched ``page_size`` at a time."""
        req = c._list_request(status, agent_id, procedure, page_size)
        while True:
            self._check_open("call the gateway")
            resp = await self._rpc(self._stub.ListTasks(req, timeout=self.timeout))
            for t in resp.tasks:
                yield c._task(t)
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    # Cluster.

    async def agents(self) -> List[Agent]:
        """The agents the gateway knows, with their membership state."""
        self._check_open("call the gateway")
        resp = await self._rpc(self._stub.ListAgents(pb.ListAgentsRequest(), timeout=self.timeout))
        return [c._agent(a) for a in resp.agents]

    async def procedures(self) -> Dict[str, List[str]]:
        """Procedure name -> ids of the alive, non-blacklisted agents offering it."""
        self._check_open("call the gateway")
        req = pb.ListProceduresRequest()
        return c._procedures(await self._rpc(self._stub.ListProcedures(req, timeout=self.timeout)))

    async def describe(self, procedure: str) -> ProcedureSchema:
        """How to call ``procedure``: its kind and, for an Opal model, its parameters."""
        self._check_open("call the gateway")
        req = pb.DescribeProcedureRequest(procedure=procedure)
        return c._schema(await self._rpc(self._stub.DescribeProcedure(req, timeout=self.timeout)))

    async def blacklist(self, agent_id: str) -> Agent:
        """Excludes the agent from task placement."""
        self._check_open("call the gateway")
        req = pb.BlacklistAgentRequest(agent_id=c._text("agent_id", agent_id))
        return c._agent(await self._rpc(self._stub.BlacklistAgent(req, timeout=self.timeout)))

    async def unblacklist(self, agent_id: str) -> Agent:
        """Returns a blacklisted agent to task placement."""
        self._check_open("call the gateway")
        req = pb.UnblacklistAgentRequest(agent_id=c._text("agent_id", agent_id))
        return c._agent(await self._rpc(self._stub.UnblacklistAgent(req, timeout=self.timeout)))


class TaskHandle:
    """A submitted task: ``await handle.result(timeout=30)`` is its value or raises
    :class:`TaskFailed`. From :meth:`Client.start` or :meth:`Client.task`."""

    def __init__(self, client: Client, task_id: str) -> None:
        self.client = client
        self.id = task_id

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"

    async def get(self, wait: Optional[Seconds] = None) -> Task:
        """The task now (see :meth:`Client.get`)."""
        return await self.client.get(self.id, wait)

    async def status(self) -> TaskStatus:
        """Its status now."""
        return (await self.get()).status

    async def wait(self, timeout: Optional[Seconds] = None) -> Task:
        """The ended task (see :meth:`Client.wait`)."""
        return await self.client.wait(self.id, timeout)

    async def result(self, timeout: Optional[Seconds] = None) -> Any:
        """Its value once it ended; :class:`TaskFailed` when it ended otherwise,
        :class:`TimeoutError` when it did not end within ``timeout``."""
        return await self.client.result(self.id, timeout)

    def watch(self, timeout: Optional[Seconds] = None) -> AsyncIterator[Task]:
        """Its changes until it ends (see :meth:`Client.watch`)."""
        return self.client.watch(self.id, timeout)

    async def cancel(self) -> Task:
        """Cancels it (see :meth:`Client.cancel`)."""
        return await self.client.cancel(self.id)
