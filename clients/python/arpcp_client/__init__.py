"""Python client of the arpcp gateway: :class:`Client` blocks, :class:`arpcp_client.aio.Client`
is the asyncio one with the same calls.

>>> from arpcp_client import Client
>>> c = Client("127.0.0.1:50051")
>>> c.start("add", 2, 3).result(timeout=10)
5
"""

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
    ProcedureSchema,
    Progress,
    Table,
    Task,
    TaskFailed,
    TaskStatus,
    from_value,
    to_value,
)
from .client import MAX_ON_DONE_POLLS, MAX_ON_DONE_TASKS, Client, TaskHandle

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
