"""What the fake API says on the wire: its actions, RetCodes, error bodies and the reply record.

Shared by the scenarios (receipts are serialized once), the faults (which replace answers) and the
service; it imports nothing from the simulator, so every other module can import it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

RET_OK = 0
RET_INVALID = 215392
RET_MISSING = 215397
RET_AUTH = 215398
RET_SERVER = 215400
RET_UNKNOWN = 299999

GET_RECEIPT = "GetUSMSSendReceipt"
SEND_BATCH = "SendBatchUSMSMessage"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def json_reply(status: int, payload: Any) -> Reply:
    return Reply(status, dumps(payload).encode("utf-8"))


def error(action: str, ret_code: int, message: str) -> dict[str, Any]:
    return {"RetCode": ret_code, "Message": message, "Action": f"{action}Response"}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
