"""A real Apache Kafka broker for development and tests: `LocalKafka` (jars from Maven Central).

>>> from tensortrace.devkafka import LocalKafka
>>> with LocalKafka() as kafka:
...     print(kafka.bootstrap)        # "127.0.0.1:<free port>"

`tensortrace kafka` (devkafka/main.py) runs one from the command line.
"""

from tensortrace.devkafka.broker import (
    LocalKafka,
    LocalKafkaConfig,
    LocalKafkaError,
    broker_properties,
    default_libs_dir,
    free_port,
    port_is_free,
)

__all__ = ["LocalKafka", "LocalKafkaConfig", "LocalKafkaError", "broker_properties",
           "default_libs_dir", "free_port", "port_is_free"]
