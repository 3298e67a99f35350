"""One exception hierarchy for the read-back SDK, the query service and `tensortrace show`.

    try:
        client.tensors(trace_id="not-hex")
    except InvalidQuery as e:
        print(e)
"""

from __future__ import annotations


class QueryError(Exception):
    """Base of every read-back error."""


class InvalidQuery(QueryError, ValueError):
    """The query itself is wrong (bad trace id, hook name, layer, conflicting arguments)."""


class AmbiguousRequest(InvalidQuery):
    """A trace id matches several requests; pass request_id= (the candidates are in .request_ids)."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids


class NotFound(QueryError, LookupError):
    """No request with that trace id / request id is stored."""


class QueryTimeout(QueryError, TimeoutError):
    """Waited the configured time and the request did not appear."""


class BackendUnavailable(QueryError):
    """ClickHouse or the query service could not be reached."""


class IncompleteData(QueryError):
    """The view asked for needs positions or layers that were not captured or not loaded."""
