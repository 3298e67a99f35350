"""`tensortrace kafka`: run a local Apache Kafka broker until Ctrl-C (or SIGTERM).

    tensortrace kafka                       # free port, temp data dir
    tensortrace kafka --port 9092 --data-dir /tmp/kafka
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tensortrace.devkafka.broker import LocalKafka, LocalKafkaConfig, LocalKafkaError, default_libs_dir


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tensortrace kafka", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="broker port on 127.0.0.1 (0: pick a free one)")
    p.add_argument("--controller-port", type=int, default=0, help="KRaft controller port (0: free)")
    p.add_argument("--data-dir", default=None, help="keep data here (default: a temp dir, removed on exit)")
    p.add_argument("--libs-dir", default=default_libs_dir(), help="dir with the broker jars (make kafka-jars)")
    p.add_argument("--heap", default="512m", help="JVM max heap (default 512m)")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for readiness")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    config = LocalKafkaConfig(libs_dir=args.libs_dir, broker_port=args.port,
                              controller_port=args.controller_port, data_dir=args.data_dir,
                              heap=args.heap, ready_timeout_s=args.ready_timeout)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        kafka = LocalKafka(config)
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
    try:
        print(f"Kafka broker ready: bootstrap {kafka.bootstrap}  (pid {kafka.pid}, data {kafka.data_dir})",
              flush=True)
        print(f"log: {kafka.log_path}    Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            if not kafka.running:
                print("error: the Kafka broker exited on its own; see its log above", file=sys.stderr)
                print(kafka.log_tail(), file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        kafka.close()
        print("Kafka broker stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
