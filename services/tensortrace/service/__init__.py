"""`tensortrace.service`: the machinery every long-running service shares (no service logic here,
and no imports of any service package).

    from tensortrace.service import service_main
    def main(argv=None) -> int:      # `tensortrace loader`
        return service_main("loader", LoaderConfig, LoaderService, argv, http_port=9465)

  config.py    ConfigError, Problems (every problem at once), flags generated from a config dataclass
  runtime.py   service_main / ServiceSpec: flags -> validate -> logging -> build -> HTTP endpoint ->
               port report -> run until SIGTERM -> bounded drain; the Service protocol
  endpoint.py  HttpEndpoint: /healthz, /readyz, /metrics (the service's own registry)
  backoff.py   Backoff: doubling, capped, stoppable retry delays
  kafka.py     KafkaConfig: one Kafka client configuration (bootstrap, SASL, TLS) for every service
"""

from tensortrace.service.backoff import Backoff
from tensortrace.service.config import ConfigError, Problems, config_from_args, flags_from_dataclass
from tensortrace.service.endpoint import HttpEndpoint
from tensortrace.service.kafka import KafkaConfig
from tensortrace.service.runtime import RuntimeConfig, Service, ServiceSpec, service_main

__all__ = ["Backoff", "ConfigError", "HttpEndpoint", "KafkaConfig", "Problems", "RuntimeConfig", "Service",
           "ServiceSpec", "config_from_args", "flags_from_dataclass", "service_main"]
