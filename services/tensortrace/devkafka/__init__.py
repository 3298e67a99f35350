"""Real Apache Kafka for development and tests (jars from Maven Central): `LocalKafka` (one
node), `LocalKafkaCluster` (three nodes), both optionally with a SASL_SSL listener.

    from tensortrace.devkafka import LocalKafka, LocalKafkaCluster
    with LocalKafka() as kafka:
        print(kafka.bootstrap)        # "127.0.0.1:<free port>"
    with LocalKafkaCluster(security="SASL_SSL") as kafka:
        kafka.brokers[0].kill(); kafka.brokers[0].start()
        kc = kafka.client_config()    # tensortrace.service.kafka.KafkaConfig (SCRAM-SHA-512 over TLS)

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
from tensortrace.devkafka.cluster import LocalKafkaCluster

__all__ = ["LocalKafka", "LocalKafkaCluster", "LocalKafkaConfig", "LocalKafkaError", "broker_properties",
           "default_libs_dir", "free_port", "port_is_free"]
