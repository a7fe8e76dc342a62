"""The jobs' output as Cloud Logging entries, and ListLogEntries over them.

Every line a job's container writes becomes one entry of the ``ml_job`` monitored resource, as
Vertex AI writes them: log ``projects/P/logs/workerpool0-0``, severity INFO for stdout and ERROR
for stderr. Entries are stamped when the line is read: timestamps (microsecond steps) and insert
ids strictly increase across the store, so ``timestamp > last seen`` never skips nor repeats one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from google.api import monitored_resource_pb2
from google.cloud.logging_v2 import types as logging_types
from google.protobuf import timestamp_pb2

from .filters import Field, Fields, compile_filter, equalities
from .validation import invalid

#: google.logging.type.LogSeverity, in increasing order.
SEVERITIES = {"DEFAULT": 0, "DEBUG": 100, "INFO": 200, "NOTICE": 300, "WARNING": 400, "ERROR": 500,
              "CRITICAL": 600, "ALERT": 700, "EMERGENCY": 800}
INFO, ERROR = SEVERITIES["INFO"], SEVERITIES["ERROR"]
RESOURCE_TYPE = "ml_job"
DEFAULT_PAGE_SIZE = 50  # Cloud Logging's
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class LogLine:
    """One entry: a line of one replica's output."""

    seq: int
    project: str
    job_id: str
    task: str
    text: str
    severity: int
    ts_ns: int
    insert_id: str
    resource_labels: dict[str, str] = field(hash=False, compare=False)

    @property
    def log_name(self) -> str:
        """``projects/P/logs/<task>``, where Vertex AI writes a replica's output."""
        return f"projects/{self.project}/logs/{self.task}"

    def to_proto(self) -> logging_types.LogEntry:
        """The LogEntry the real API returns for this line."""
        stamp = timestamp_pb2.Timestamp(seconds=self.ts_ns // 1_000_000_000, nanos=self.ts_ns % 1_000_000_000)
        return logging_types.LogEntry(
            log_name=self.log_name, text_payload=self.text, severity=self.severity, insert_id=self.insert_id,
            timestamp=stamp, receive_timestamp=stamp,
            resource=monitored_resource_pb2.MonitoredResource(type=RESOURCE_TYPE, labels=self.resource_labels))


FIELDS = Fields(
    {
        "resource.type": Field("string", lambda e: RESOURCE_TYPE),
        "timestamp": Field("timestamp", lambda e: e.ts_ns),
        "receiveTimestamp": Field("timestamp", lambda e: e.ts_ns),
        "severity": Field("severity", lambda e: e.severity, SEVERITIES),
        "logName": Field("string", lambda e: e.log_name),
        "insertId": Field("string", lambda e: e.insert_id),
        "textPayload": Field("string", lambda e: e.text),
    },
    maps={"resource.labels": Field("map", lambda e: e.resource_labels), "labels": Field("map", lambda e: {})},
)
# The API also accepts the fields' snake_case names.
FIELDS.exact.update({"receive_timestamp": FIELDS.exact["receiveTimestamp"], "log_name": FIELDS.exact["logName"],
                     "insert_id": FIELDS.exact["insertId"], "text_payload": FIELDS.exact["textPayload"]})


class LogStore:
    """Every job's entries, in the order they were written (which is timestamp order)."""

    def __init__(self) -> None:
        self._all: dict[str, list[LogLine]] = {}
        self._by_job: dict[tuple[str, str], list[LogLine]] = {}
        self._seq = 0
        self._last_ns = 0
        # Insert ids start with this store's creation time: ids stay unique across restarts.
        self._prefix = f"{time.time_ns() // 1000:016x}"

    def __len__(self) -> int:
        return self._seq

    def append(self, project: str, job_id: str, text: str, severity: int, task: str = "workerpool0-0") -> LogLine:
        """Record one line now."""
        self._seq += 1
        now_us = time.time_ns() // 1000
        self._last_ns = max(now_us * 1000, self._last_ns + 1000)
        line = LogLine(self._seq, project, job_id, task, text, severity, self._last_ns,
                       f"{self._prefix}{self._seq:010d}",
                       {"job_id": job_id, "project_id": project, "task_name": task})
        self._all.setdefault(project, []).append(line)
        self._by_job.setdefault((project, job_id), []).append(line)
        return line

    def lines(self, project: str, job_id: str) -> list[LogLine]:
        """A job's entries so far."""
        return list(self._by_job.get((project, job_id), ()))

    def list_entries(self, request: logging_types.ListLogEntriesRequest) -> logging_types.ListLogEntriesResponse:
        """ListLogEntries: resource names, filter, order, pages."""
        names = list(request.resource_names)
        if not names:
            raise invalid("resource_names: at least one resource name is required, e.g. \"projects/my-project\".")
        projects = []
        for name in names:
            match = re.fullmatch(r"(projects|organizations|folders|billingAccounts)/([^/]+)", name)
            if match is None:
                raise invalid(f'Invalid resource name "{name}": expected "projects/[PROJECT_ID]".')
            if match.group(1) == "projects":
                projects.append(match.group(2))
        order = " ".join(request.order_by.lower().split()) or "timestamp asc"
        if order not in ("timestamp asc", "timestamp desc"):
            raise invalid(f'Invalid order_by "{request.order_by}": use "timestamp asc" or "timestamp desc".')
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            raise invalid(f"Invalid page_size {request.page_size}: it must be between 1 and {MAX_PAGE_SIZE}.")
        keep = compile_filter(request.filter, FIELDS)
        query = _digest(names, request.filter, order)
        after = _decode_token(request.page_token, query) if request.page_token else None
        job_id = equalities(request.filter).get("resource.labels.job_id")
        candidates: list[LogLine] = []
        for project in dict.fromkeys(projects):
            source = self._by_job.get((project, job_id), []) if job_id is not None else self._all.get(project, [])
            candidates.extend(source)
        descending = order.endswith("desc")
        candidates.sort(key=lambda e: e.seq, reverse=descending)
        page: list[LogLine] = []
        more = False
        for entry in candidates:
            if after is not None and (entry.seq >= after if descending else entry.seq <= after):
                continue
            if keep(entry):
                if len(page) == size:
                    more = True
                    break
                page.append(entry)
        token = _encode_token(page[-1].seq, query) if more else ""
        return logging_types.ListLogEntriesResponse(entries=[e.to_proto() for e in page], next_page_token=token)


def _digest(names: list[str], filter_text: str, order: str) -> str:
    return hashlib.sha256(json.dumps([names, filter_text, order]).encode()).hexdigest()[:12]


def _encode_token(seq: int, query: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": seq, "query": query}).encode()).decode()


def _decode_token(token: str, query: str) -> int:
    """The last entry of the previous page; the token must come from the same query."""
    try:
        data: Any = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("after"), int):
        raise invalid("Invalid page_token: pass next_page_token of a previous response unchanged.")
    if data.get("query") != query:
        raise invalid("Invalid page_token: it belongs to a request with other resource_names, filter or order_by.")
    return int(data["after"])
