"""Node-local exporter: drains every shared-memory ring on the node into Kafka (docs/exporter.md)."""
