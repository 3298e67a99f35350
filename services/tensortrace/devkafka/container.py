"""Kafka in a container via testcontainers, used by the test fixtures only where a Docker engine
answers. Same surface as LocalKafka: `.bootstrap`, `.start()`, `.stop()`, `.close()`, `.kind`.

    if docker_answers():
        kafka = ContainerKafka().start()

stop()/start() pause and unpause the container: the broker becomes unreachable and comes back on
the same address with its data (a restart could move Docker's ephemeral host port).
"""

from __future__ import annotations

DEFAULT_IMAGE = "confluentinc/cp-kafka:7.6.0"  # Apache Kafka 3.6 in KRaft mode (testcontainers' default)


def docker_answers(timeout_s: float = 2.0) -> bool:
    """True when a Docker engine answers a ping within timeout_s."""
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


class ContainerKafka:
    def __init__(self, image: str = DEFAULT_IMAGE):
        self.image = image
        self.kind = f"testcontainers Kafka ({image}, KRaft)"
        self._container = None
        self._paused = False
        self.bootstrap: str | None = None

    @property
    def running(self) -> bool:
        return self._container is not None and not self._paused

    def start(self) -> "ContainerKafka":
        if self._container is None:
            from testcontainers.community.kafka import KafkaContainer

            self._container = KafkaContainer(self.image).with_kraft().start()
            self.bootstrap = self._container.get_bootstrap_server()
        elif self._paused:
            self._container.get_wrapped_container().unpause()
            self._paused = False
        return self

    def stop(self) -> None:
        if self._container is not None and not self._paused:
            self._container.get_wrapped_container().pause()
            self._paused = True

    def close(self) -> None:
        if self._container is not None:
            if self._paused:
                self._container.get_wrapped_container().unpause()
            self._container.stop()
            self._container = None
