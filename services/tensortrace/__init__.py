"""TensorTrace: model-internal observability for LLM serving.

Capture agent (inside the inference process) -> Ring² (shared-memory ring) -> node-local exporter
-> Kafka -> loader (ClickHouse) / probes / OpenTelemetry bridge.
"""

__version__ = "0.1.0"
