"""Python client of the arpcp gateway.

>>> from arpcp_client import Client
>>> c = Client("127.0.0.1:50051")
>>> task_id = c.submit("add", 2, 3)
>>> c.wait(task_id, timeout=10).result
5
"""

from .client import (
    FINAL_STATUSES,
    Agent,
    Algorithm,
    Client,
    Column,
    GatewayError,
    Parameter,
    Partition,
    ProcedureSchema,
    Progress,
    Table,
    Task,
    TaskFailed,
    from_value,
    to_value,
)

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
