"""Is a request complete? One rule, applied by every reader: the query SDK (rows in ClickHouse) and
the per-request view of the stream consumers (records off Kafka: bridge, probes).

>>> summary = pb.RequestSummary(request_id="r1", records_captured=40, complete=True)
>>> completeness([summary], records_loaded=40).state
'complete'
>>> completeness([summary], records_loaded=38).state               # the rest may still arrive
'loading'
>>> c = completeness([summary], records_loaded=38, final=True)      # the reader waits no longer
>>> c.state, c.incomplete_reason
('incomplete', '38 of 40 captured records arrived')

A request's producer (one per TP rank) writes one RequestSummary after its last record. The
summary counts the records it captured and the ones it dropped (by reason). So:
  * "incomplete"  a summary says records were dropped, or the request was cut short;
  * "loading"     summaries present, but fewer distinct records seen than they announce, or fewer
                  producers' summaries than they say write one (`producers`: the TP ranks) (yet);
  * "no_summary"  records seen but no summary (still in flight, or the producer died);
  * "complete"    every summary says complete and every announced record is there.
A reader that cannot wait any longer (`final=True`: the stream view after its timeout) turns
"loading" into "incomplete" with the count in the reason, so no consumer ever sees a partial
request as whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tensortrace.v1 import records_pb2 as pb


@dataclass
class Completeness:
    """What the request's summaries say, checked against the records seen.

    state: "complete" | "incomplete" | "loading" | "no_summary" (module docstring).
    """
    state: str
    records_captured: int = 0
    records_dropped: int = 0
    records_loaded: int = 0                # distinct records seen (loaded, or received)
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    incomplete_reason: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""
    sampled: bool = True
    summaries: int = 0

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def completeness(summaries: list[pb.RequestSummary], records_loaded: int, final: bool = False,
                 waited_s: float | None = None) -> Completeness:
    """The completeness of one request from its summaries (one per producer) and the number of
    distinct records seen. `final`: no more records will be waited for (see module docstring)."""
    if not summaries:
        return Completeness("no_summary", records_loaded=records_loaded,
                            incomplete_reason=(f"no summary arrived within {waited_s:.1f}s" if final and waited_s is not None
                                               else "no summary" if final else ""))
    captured = sum(s.records_captured for s in summaries)
    dropped = sum(s.records_dropped for s in summaries)
    by_reason: dict[str, int] = {}
    for s in summaries:
        for k, v in s.dropped_by_reason.items():
            by_reason[k] = by_reason.get(k, 0) + v
    reasons = sorted({s.incomplete_reason for s in summaries if s.incomplete_reason})
    head = summaries[0]
    expected = max(max(s.producers for s in summaries), 1)
    producers_seen = len({(s.producer.pod, s.producer.pid, s.producer.generation, s.producer.tp_rank) for s in summaries})
    if not all(s.complete for s in summaries) or dropped:
        state = "incomplete"
    elif records_loaded < captured or producers_seen < expected:
        state = "loading"
        if final:
            state = "incomplete"
            within = f" within {waited_s:.1f}s" if waited_s is not None else ""
            if producers_seen < expected:
                reasons.append(f"summaries of {producers_seen} of {expected} producers (TP ranks) arrived{within}")
            if records_loaded < captured:
                reasons.append(f"{records_loaded} of {captured} captured records arrived{within}")
    else:
        state = "complete"
    return Completeness(state, captured, dropped, records_loaded, by_reason, "; ".join(reasons),
                        head.prompt_tokens, head.generated_tokens, head.finish_reason,
                        all(s.sampled for s in summaries), len(summaries))
