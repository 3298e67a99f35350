"""`tensortrace bridge`: the OpenTelemetry bridge, a consumer service on `tensortrace.consume`.

Each captured request (records and summary off the activation topic, grouped and judged complete
by the RequestView) becomes spans in the request's own W3C trace: `tensortrace.capture` (child of
the request's span), `tensortrace.export` and `tensortrace.kafka` (children of capture) and, opt-in,
one `tensortrace.step` per forward step linked to the requests of that batch, and one
`tensortrace.probe` per probe verdict (the probe service's scores topic), with deterministic ids, exported over OTLP (the SDK's exporters) and/or into ClickHouse's `otel_traces`
(the OTel Collector ClickHouse exporter's shape). It also receives the serving engine's own spans
over OTLP and stores them the same way, so both share one trace in one table. docs/bridge.md.

  config.py   BridgeConfig (ConsumerConfig + destinations)
  spans.py    pure: CapturedRequest (+ RecordStats) -> SpanData; otel_traces columns
  export.py   OtlpWriter, ClickHouseWriter, OtlpForwarder: durable before returning, retried with Backoff
  service.py  BridgeSink (RequestView + batch export), BridgeService, metrics
  main.py     the `tensortrace bridge` ServiceSpec

The serving engine's own spans (SGLang --enable-trace) through the bridge:
  receiver.py OTLP/gRPC + OTLP/HTTP receivers -> the spans topic (acks=all before the export returns)
  otlp.py     pure: validation, splitting for Kafka, otel_traces rows as the Collector's exporter writes them
  engine.py   EngineSpansSink: the spans topic (a second ConsumerCore, decode=otlp.decode_message) ->
              the same destinations

The probe service's verdicts:
  probes.py   probe_span (pure), ProbeSpansSink: the probe scores topic (a third ConsumerCore,
              decode=probes.decode_probe_score) -> tensortrace.probe spans, the same destinations
"""
