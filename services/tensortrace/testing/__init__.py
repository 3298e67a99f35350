"""Helpers that tests and benchmarks import: test data, traffic generators, bounded waits, Kafka and
ClickHouse checks. One copy of each, so no test copies another's helper or puts a folder on sys.path.

    from tensortrace.testing.synthetic import SyntheticRequest, produce   # records as the exporter publishes them
    from tensortrace.testing.ringgen import TrafficGen                    # frames as the agent writes them
    from tensortrace.testing.tiny_models import make, left_padded         # tiny random HF models
    from tensortrace.testing.kafka import create_topics, committed, end_offsets, produce, consume_all
    from tensortrace.testing.clickhouse import store, count_rows
    from tensortrace.testing.waiting import wait_until, wait_for_exit

This package may import any other; no service, contract or machinery package may import it
(tests/repo/test_repo_contracts.py enforces both).
"""
