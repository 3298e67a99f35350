"""`tensortrace kafka`: run a local Apache Kafka broker (or a three-node cluster) until Ctrl-C (or SIGTERM).

    tensortrace kafka                       # one broker: free port, temp data dir
    tensortrace kafka --port 9092 --data-dir /tmp/kafka
    tensortrace kafka --brokers 3 --security SASL_SSL   # 3 KRaft nodes + SASL_SSL (SCRAM) listeners
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tensortrace.devkafka.broker import (
    SECURITY_MODES,
    LocalKafka,
    LocalKafkaConfig,
    LocalKafkaError,
    default_libs_dir,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tensortrace kafka", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="broker port on 127.0.0.1 (0: pick a free one; one broker only)")
    p.add_argument("--controller-port", type=int, default=0, help="KRaft controller port (0: free; one broker only)")
    p.add_argument("--brokers", type=int, default=1, help="1: one broker; 3: a local cluster (RF 3, min.insync 2)")
    p.add_argument("--security", default="PLAINTEXT", choices=SECURITY_MODES,
                   help="SASL_SSL: add a SASL_SSL listener (SCRAM-SHA-512/256, PLAIN; keytool certificates)")
    p.add_argument("--sasl-username", default="tensortrace", help="the SCRAM/PLAIN user (--security SASL_SSL)")
    p.add_argument("--data-dir", default=None, help="keep data here (default: a temp dir, removed on exit)")
    p.add_argument("--libs-dir", default=default_libs_dir(), help="dir with the broker jars (make kafka-jars)")
    p.add_argument("--heap", default=None, help="JVM max heap per broker (default 512m; 320m per node of a cluster)")
    p.add_argument("--ready-timeout", type=float, default=None, help="seconds to wait for readiness")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    kw = dict(libs_dir=args.libs_dir, data_dir=args.data_dir, security=args.security,
              sasl_username=args.sasl_username)
    if args.heap:
        kw["heap"] = args.heap
    if args.ready_timeout:
        kw["ready_timeout_s"] = args.ready_timeout
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if args.brokers == 1:
            kafka = LocalKafka(LocalKafkaConfig(broker_port=args.port, controller_port=args.controller_port, **kw))
        else:
            from tensortrace.devkafka.cluster import LocalKafkaCluster

            if args.port or args.controller_port:
                raise LocalKafkaError("--port/--controller-port are for one broker; a cluster picks free ports")
            kafka = LocalKafkaCluster(args.brokers, **kw)
    except LocalKafkaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        kafka.start()
    except LocalKafkaError as e:
        kafka.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kafka.close()
        print("interrupted before the broker was ready; stopped it", file=sys.stderr)
        return 130
    nodes = getattr(kafka, "brokers", [kafka])
    try:
        what = "Kafka broker" if len(nodes) == 1 else f"Kafka cluster of {len(nodes)} nodes"
        print(f"{what} ready in {kafka.last_start_s:.1f}s: bootstrap {kafka.bootstrap}  (data {kafka.data_dir})",
              flush=True)
        if args.security == "SASL_SSL":
            kc = kafka.client_config()
            print(f"SASL_SSL listener: {kc.bootstrap_servers}  user {kc.sasl_username!r}, password in "
                  f"{kc.sasl_password_file}, CA {kc.ssl_cafile}", flush=True)
            print("service flags: " + " ".join(kc.cli_args()), flush=True)
        for n in nodes:
            print(f"log: {n.log_path}", flush=True)
        print("Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            dead = [n for n in nodes if not n.running]
            if dead:
                print("error: a Kafka broker exited on its own; see its log below", file=sys.stderr)
                print(dead[0].log_tail(), file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        kafka.close()
        print("Kafka stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
