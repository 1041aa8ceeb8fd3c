"""The asyncio client (arpcp_client.aio) against the real gateway and two agents of
conftest.py. Each test runs its own event loop with asyncio.run, as a user's program does."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import grpc
import pytest

from arpcp_client import ClientClosed, GatewayError, Task, TaskFailed, TaskStatus
from arpcp_client.aio import Client, TaskHandle

# Every wait in these tests ends by this many seconds.
WAIT = 20.0
T = TypeVar("T")


def run(main: Callable[[Client], Awaitable[T]], grpc_target: str) -> T:
    """Runs ``main(client)`` in a new event loop, with a client made inside it, and
    fails the test if the whole takes more than a bounded time."""

    async def outer() -> T:
        async with Client(grpc_target, timeout=10) as client:
            return await asyncio.wait_for(main(client), timeout=3 * WAIT)

    return asyncio.run(outer())


def test_gather_runs_50_tasks_without_a_thread_per_task(cluster) -> None:
    async def main(client: Client) -> tuple[list[Any], int, int]:
        before = threading.active_count()
        handles = await asyncio.gather(*(client.start("add", i, 1000) for i in range(50)))
        assert all(isinstance(h, TaskHandle) for h in handles)
        assert len({h.id for h in handles}) == 50
        waits = [asyncio.ensure_future(h.result(timeout=WAIT)) for h in handles]
        # Fifty waits in flight: the loop's thread serves them all.
        during = threading.active_count()
        results = await asyncio.gather(*waits)
        return results, before, during

    results, before, during = run(main, cluster.grpc)
    assert results == [i + 1000 for i in range(50)]
    assert during - before <= 2, (before, during)


def test_watch_yields_progress_until_done(cluster) -> None:
    async def main(client: Client) -> list[Task]:
        task_id = await client.submit("sleep", 1)
        return [t async for t in client.watch(task_id, timeout=WAIT)]

    seen = run(main, cluster.grpc)
    assert seen and seen[-1].status is TaskStatus.DONE
    assert all(not t.ended for t in seen[:-1]), [t.status for t in seen]
    fractions = [t.progress.fraction for t in seen if t.status == "running" and t.progress]
    assert len({f for f in fractions if 0 < f < 1}) >= 2, fractions
    assert fractions == sorted(fractions)


def test_result_raises_task_failed_and_call_returns_the_value(cluster) -> None:
    async def main(client: Client) -> None:
        assert await client.call("mul", 6, 7, timeout=WAIT) == 42
        assert await client.call("echo", name="x", n=3) == {"name": "x", "n": 3}
        with pytest.raises(TaskFailed) as e:
            await (await client.start("div", 1, 0)).result(timeout=WAIT)
        assert e.value.status is TaskStatus.FAILED and e.value.error_code == 400
        assert "division by zero" in e.value.error
        with pytest.raises(TaskFailed) as e:
            await client.call("add", 1, timeout=WAIT)
        assert e.value.status == "client_error" and e.value.error_code == 204

        slow = await client.start("sleep", 30)
        try:
            with pytest.raises(TimeoutError):
                await slow.result(timeout=0.3)
            assert await slow.status() in {TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING}
        finally:
            assert (await slow.cancel()).status is TaskStatus.CANCELLED
        assert (await client.task(slow.id).wait(timeout=WAIT)).status == "cancelled"

    run(main, cluster.grpc)


def test_gateway_errors_name_what_is_wrong(cluster) -> None:
    missing = str(uuid.uuid4())

    async def main(client: Client) -> None:
        with pytest.raises(GatewayError) as e:
            await client.submit("no_such_procedure_xyz", 1)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "no_such_procedure_xyz" in e.value.message
        with pytest.raises(GatewayError) as e:
            await client.get(missing)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and missing in e.value.message
        with pytest.raises(GatewayError) as e:
            [t async for t in client.watch(missing, timeout=WAIT)]
        assert e.value.code == grpc.StatusCode.NOT_FOUND

    run(main, cluster.grpc)


def test_listing_tasks_agents_procedures_and_describe(cluster) -> None:
    async def main(client: Client) -> None:
        ids = [await client.submit("mul", i, 2000) for i in range(5)]
        for task_id in ids:
            assert (await client.wait(task_id, timeout=WAIT)).status == "done"
        # Several pages of two, newest first.
        mine = [t.task_id async for t in client.tasks(procedure="mul", page_size=2) if t.task_id in ids]
        assert mine == ids[::-1]
        done = [t async for t in client.tasks(status=TaskStatus.DONE, procedure="mul")]
        assert set(ids) <= {t.task_id for t in done}

        agents = await client.agents()
        assert len(agents) == 2 and {a.state for a in agents} == {"alive"}
        procedures = await client.procedures()
        assert sorted(procedures["add"]) == sorted(a.agent_id for a in agents)
        assert (await client.describe("add")).kind == "builtin"
        black = agents[0].agent_id
        try:
            assert (await client.blacklist(black)).blacklisted
        finally:
            assert not (await client.unblacklist(black)).blacklisted

    run(main, cluster.grpc)


def test_a_closed_client_raises_client_closed(cluster) -> None:
    async def main() -> None:
        client = Client(cluster.grpc, timeout=10)
        task_id = await client.submit("add", 1, 2)
        await client.close()
        assert client.closed
        for call in (
            lambda: client.submit("add", 1, 2),
            lambda: client.get(task_id),
            lambda: client.wait(task_id, timeout=1),
            lambda: client.agents(),
        ):
            with pytest.raises(ClientClosed) as e:
                await call()
            assert "closed" in str(e.value) and "new Client" in str(e.value)
        with pytest.raises(ClientClosed):
            [t async for t in client.watch(task_id)]
        with pytest.raises(ClientClosed):
            [t async for t in client.tasks()]

    asyncio.run(main())


def test_close_ends_calls_in_flight_with_client_closed(cluster) -> None:
    # grpc.aio cancels a closed channel's calls: they ended with CancelledError, which
    # looks to asyncio like the caller's task was cancelled.
    async def main() -> None:
        client = Client(cluster.grpc, timeout=10)
        task_id = await client.submit("sleep", 5)

        async def watching() -> None:
            async for _ in client.watch(task_id):
                pass

        waits = [
            asyncio.create_task(client.wait(task_id)),
            asyncio.create_task(client.get(task_id, wait=10)),
            asyncio.create_task(watching()),
        ]
        await asyncio.sleep(0.5)
        await client.close()
        for w in waits:
            with pytest.raises(ClientClosed):
                await w
            assert not w.cancelled()
        # The caller's own cancellation still goes through as a cancellation.
        other = Client(cluster.grpc, timeout=10)
        try:
            w = asyncio.create_task(other.wait(task_id))
            await asyncio.sleep(0.2)
            w.cancel()
            with pytest.raises(asyncio.CancelledError):
                await w
        finally:
            await other.close()

    asyncio.run(main())


def test_tls_arguments_are_checked_as_in_the_blocking_client() -> None:
    async def main() -> None:
        with pytest.raises(ValueError) as e:
            Client("127.0.0.1:1", token="secret")
        assert "ca=" in str(e.value)
        with pytest.raises(ValueError) as e:
            Client("127.0.0.1:1", ca="/nonexistent/ca.pem")
        assert "CA certificate" in str(e.value) and "/nonexistent/ca.pem" in str(e.value)

    asyncio.run(main())
