"""The exporter: watches a ring directory, drains every ring into Kafka, serves control + metrics.

One main thread does all ring work (scan, read, build messages, handle acknowledgements, release);
kafka-python's sender thread does the network I/O; the gRPC and HTTP servers run in their own
threads and touch ring state only under `self.lock`.

    exp = Exporter(ExporterConfig(ring_dir="/tmp/rings", kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092")))
    exp.start()          # control endpoint
    exp.run()            # until exp.stop() (SIGTERM: the service runtime, main.py)

It is a `tensortrace.service.Service`: the runtime serves its `registry` at /metrics, `live()` at
/healthz and `ready()` at /readyz, and reports `ports()`.

Discovery and identity (docs/operations.md "Pod isolation and the threat model"): every inference
pod writes into its own subdirectory, `<ring dir>/<namespace>_<pod>/<pod>-<pid>-r<rank>.ring`, one
level deep; the exporter takes the producer's pod from that directory's name (published as
`<namespace>/<pod>`) and the node from its own `--node`, never from the ring header, which the pod
wrote. A ring whose header names another pod is quarantined (`identity_mismatch`, its frames counted
as dropped for that reason), so nothing is ever published under a name its writer claimed. Rings
directly in the ring directory (the flat layout of tests and the devstack) are read only with
`--allow-flat-rings`, identity from the header as before; otherwise refused (`flat_ring`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time

from prometheus_client import CollectorRegistry

from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.drain import FrameDropReason, RingDrain
from tensortrace.exporter.metrics import ExporterMetrics
from tensortrace.exporter.publisher import KafkaPublisher
from tensortrace.ring.format import RingError, RingFormatError, RingLockedError, RingNotRegularError, RingReader
from tensortrace.ring.permissions import (PodDir, describe_path, describe_process, dir_problem, parse_pod_dir,
                                          pod_dir_problem, ring_owner_problem)
from tensortrace.v1 import control_pb2
from tensortrace.v1 import records_pb2 as pb

log = logging.getLogger("tensortrace.exporter")


def _fingerprint(path: str) -> tuple:
    """Owner, group and mode of a path (a refusal is logged again once any of them changes)."""
    try:
        st = os.stat(path)
        return (st.st_uid, st.st_gid, st.st_mode)
    except OSError:
        return ()


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


class Exporter:
    def __init__(self, cfg: ExporterConfig, metrics: ExporterMetrics | None = None):
        self.cfg = cfg.validate()
        self.metrics = metrics or ExporterMetrics()
        self.publisher = KafkaPublisher(cfg, self.metrics)
        self.lock = threading.RLock()
        self.rings: dict[tuple[str, int], RingDrain] = {}   # (path, generation) -> state
        self.known: dict[tuple[int, int], str] = {}          # (dev, inode) -> why we do not (re)open it
        self.refused: dict[tuple, str] = {}                  # (dev, ino, mode, uid, gid) -> reason
        self.quarantined: dict[tuple[int, int], control_pb2.RingStatus] = {}
        self.default_control = dict(cfg.default_control) if cfg.default_control else None
        self.ring_controls: dict[str, dict] = {}             # ring name or pod -> control document
        self._stop = threading.Event()
        self._last_scan = 0.0
        self._last_housekeeping = 0.0
        self._heartbeat = time.monotonic()
        self._frames_read = 0   # frames read over the exporter's life (the main loop's wait adapts to it)
        self._started = time.monotonic()
        self.control_server = None
        self.control_port = -1

    # -- endpoints -------------------------------------------------------------------------
    def start(self) -> "Exporter":
        """Open the control endpoint (the HTTP endpoint is the service runtime's)."""
        cfg = self.cfg
        if cfg.control_port >= 0:
            from tensortrace.exporter.control import serve_control
            self.control_server, self.control_port = serve_control(self, cfg.control_host, cfg.control_port)
        log.info("exporter: ring dir %s, topic %s, Kafka %s, control port %d",
                 cfg.ring_dir, cfg.topic, cfg.kafka.describe(), self.control_port)
        return self

    # -- tensortrace.service.Service ---------------------------------------------------------
    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def ports(self) -> dict[str, int]:
        return {"control": self.control_port} if self.control_port >= 0 else {}

    def live(self) -> bool:
        """The main loop turns (it beats every pass: at least every `idle_poll_max_s`, 50 ms by default)."""
        return time.monotonic() - self._heartbeat < 30.0

    def not_live_reason(self) -> str:
        return f"main loop stalled for {time.monotonic() - self._heartbeat:.0f}s"

    def ready(self) -> bool:
        """A producer exists, deliveries are not failing, a bootstrap broker accepts a connection."""
        return self.publisher.ready()

    def not_ready_reason(self) -> str:
        return f"not connected to Kafka ({self.cfg.kafka.describe()})"

    def stop(self) -> None:
        self._stop.set()
        self.publisher.wake.set()

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            wake = self.publisher.wake
            passes = self.metrics.passes
            worked_pass, empty_pass = passes.labels("work"), passes.labels("empty")
            wait, woken = self.cfg.poll_s, True
            while not self._stop.is_set():
                before = self._frames_read
                while True:   # passes until one finds nothing to do
                    wake.clear()
                    worked = self.step()
                    if not worked or self._stop.is_set():
                        break
                    worked_pass.inc()
                if self._stop.is_set():
                    break
                empty_pass.inc()
                if not woken:   # the last wait ran its course: adapt it to whether frames came in it
                    wait = self.cfg.next_wait(wait, self._frames_read > before)
                woken = wake.wait(wait)   # an acknowledgement (or stop()) wakes it early
        finally:
            self.shutdown()

    def step(self) -> bool:
        """One iteration: acks, scan, drain passes. True when it did work."""
        now = time.monotonic()
        self._heartbeat = now
        worked = self._handle_completions()
        if now - self._last_scan >= self.cfg.scan_interval_s:
            self._last_scan = now
            self.scan()
        if now - self._last_housekeeping >= 0.5:
            self._last_housekeeping = now
            self._housekeeping()
        if not self.publisher.connect():
            return worked
        pub = self.publisher
        for ring in list(self.rings.values()):
            if not ring.has_unread():
                continue
            if not pub.has_room():
                self.metrics.backpressure.inc()
                break
            try:
                n = ring.drain_pass(pub)
                if n:
                    worked = True
                    self._frames_read += n
            except Exception as e:  # a bug or an unforeseen frame must not stop the other rings
                self._ring_failed(ring, "draining", e)
        return worked

    def _ring_failed(self, ring: RingDrain, doing: str, e: Exception) -> None:
        """An unexpected error in one ring's work (drain pass, release, counters, lifecycle): that ring
        is quarantined (`internal_error`, counted), the others keep flowing. Its units are forgotten
        when it is the release itself that fails (nothing could pop them), so the ring is closed and
        what it did not release is counted as dropped (update_counters), not held forever."""
        if ring.state == "quarantined":
            log.debug("ring %s: quarantined, %s failed again: %s: %s", ring.path, doing, type(e).__name__, e)
        else:
            log.exception("ring %s: unexpected error while %s", ring.path, doing)
            ring.quarantine("internal_error", f"{ring.path}: {doing}: {type(e).__name__}: {e}",
                            FrameDropReason.INTERNAL_ERROR)
        if doing != "draining":
            ring.units.clear()
            ring.units_abandoned = True   # later acknowledgements of them release nothing

    def _handle_completions(self) -> bool:
        touched = set()
        for unit, _n, _lat, exc in self.publisher.completions():
            unit.ring.on_complete(unit, exc)
            touched.add(unit.ring)
        for ring in touched:
            if ring.units_abandoned or getattr(ring, "reader_closed", False) or ring.state == "detached":
                continue   # acknowledgements of units forgotten by _ring_failed: nothing left to release
            try:
                ring.release_acked(force_all=ring.state == "quarantined")
            except Exception as e:  # one ring's release must not stop the acknowledgements of the others
                self._ring_failed(ring, "releasing acknowledged frames", e)
        return bool(touched)

    # -- discovery -------------------------------------------------------------------------
    def scan(self) -> None:
        """Attach to new rings; detach drained rings of gone producers; remove them after grace."""
        for path, st, pod, pod_path, pod_st in self._candidates():
            ident = (st.st_dev, st.st_ino)
            if ident in self.known:
                continue
            reason = self._ring_refusal(path, st, pod, pod_path, pod_st)
            if reason:
                self._refuse((st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid)
                             + _fingerprint(pod_path or self.cfg.ring_dir), path, reason)
                continue
            self._attach(path, st, pod, pod_path)
        now = time.monotonic()
        for ring in list(self.rings.values()):
            try:
                self._check_lifecycle(ring, now)
            except Exception as e:  # one ring's lifecycle must not stop the scan of the others
                self._ring_failed(ring, "checking its lifecycle", e)

    def _candidates(self) -> list[tuple]:
        """(path, lstat, PodDir or None, pod directory, its lstat) of every ring file, oldest first:
        `<ring dir>/<pod dir>/*.ring` one level deep, and `<ring dir>/*.ring` (the flat layout).
        A pod directory that must not be trusted is refused here, once per state, with its reason."""
        d = self.cfg.ring_dir
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return []
        except PermissionError as e:
            self._refuse(("ring_dir",) + _fingerprint(d), d,
                         f"ring_dir: cannot list the ring directory ({e.strerror}): {self._permission_hint(d)}")
            return []
        found = []
        for name in names:
            path = os.path.join(d, name)
            if name.endswith(".ring"):
                try:
                    found.append((path, os.lstat(path), None, None, None))
                except FileNotFoundError:
                    pass
                continue
            if name.startswith(".") or name.endswith(".consumer.lock") or ".ring.tmp-" in name:
                continue
            try:
                pst = os.lstat(path)
            except FileNotFoundError:
                continue
            if not (stat.S_ISDIR(pst.st_mode) or stat.S_ISLNK(pst.st_mode)):
                continue   # another file in the ring directory: not ours to judge
            why = pod_dir_problem(path, pst, self.cfg.ring_group)
            if why:
                self._refuse(("pod_dir", pst.st_dev, pst.st_ino, pst.st_mode, pst.st_uid, pst.st_gid), path, why)
                continue
            pod = parse_pod_dir(name)
            try:
                inner = [n for n in os.listdir(path) if n.endswith(".ring")]
            except FileNotFoundError:
                continue
            except PermissionError as e:
                self._refuse(("pod_dir", pst.st_dev, pst.st_ino, pst.st_mode, pst.st_uid, pst.st_gid), path,
                             f"pod_dir: cannot list the pod directory ({e.strerror}): {self._permission_hint(path)}")
                continue
            for n in inner:
                rp = os.path.join(path, n)
                try:
                    found.append((rp, os.lstat(rp), pod, path, pst))
                except FileNotFoundError:
                    pass
        found.sort(key=lambda c: c[1].st_mtime_ns)
        return found

    def _ring_refusal(self, path: str, st: os.stat_result, pod: PodDir | None, pod_path: str | None,
                      pod_st: os.stat_result | None) -> str:
        """Why this ring file must not be read ("" when it may): its place, its owner, its mode."""
        cfg = self.cfg
        if pod is None:
            if not cfg.allow_flat_rings:
                return (f"flat_ring: a ring directly in the ring directory {cfg.ring_dir}; each inference pod writes "
                        f"into its own subdirectory, {cfg.ring_dir}/<namespace>_<pod>/ (the chart mounts it with "
                        "subPathExpr; on a plain host set TENSORTRACE_RING_DIR=<ring dir>/<pod>), and the pod's "
                        "identity comes from that directory. Rings directly in the ring directory, identified by "
                        "their header alone, are read only with --allow-flat-rings (development)")
            return self._refusal(st, _stat(cfg.ring_dir), cfg.ring_dir)
        why = ring_owner_problem(path, st, pod_path, pod_st)
        if why:
            return why
        why = self._refusal(st, pod_st, pod_path)
        if why:
            return why
        try:  # a planted symbolic link as the lock file would make the exporter open or lock another file
            lst = os.lstat(path + ".consumer.lock")
            if not stat.S_ISREG(lst.st_mode):
                return f"not_regular: {path}.consumer.lock is not a regular file (a symbolic link?); remove it"
        except FileNotFoundError:
            pass
        # every ring of the pod the exporter holds state for (read, quarantined, detached within its
        # grace), so a pod that keeps making rings, good or bad, cannot grow the exporter's state
        busy = (sum(1 for r in self.rings.values() if os.path.dirname(r.path) == pod_path and r.path != path)
                + sum(1 for q in self.quarantined.values() if os.path.dirname(q.path) == pod_path))
        if busy >= cfg.max_rings_per_pod:
            return (f"too_many_rings: pod directory {pod_path} already has {busy} rings being read or kept "
                    f"(--max-rings-per-pod {cfg.max_rings_per_pod}); this one is read once one of them is removed")
        return ""

    def _refuse(self, fingerprint: tuple, path: str, reason: str) -> None:
        """Log a refusal once per fingerprint (file and directory owner/mode): fixing either makes it new."""
        if fingerprint not in self.refused:
            self.refused[fingerprint] = reason
            log.error("ring refused: %s: %s", path, reason)
            self.metrics.rings_refused.labels(reason.split(":")[0]).inc()

    def _refusal(self, st: os.stat_result, dir_st: os.stat_result | None = None, dir_path: str | None = None) -> str:
        """Why a ring file must not be read ("" when it may). The security check: a ring is read
        when its owner is one of --ring-owner-uids (owner-only 0600), or when it is shared with the
        ring group (--ring-group, mode 0660) in a directory other users cannot write — there only a
        member of the group (or root) can have made a file of that group. docs/operations.md
        "Ring permissions"."""
        cfg = self.cfg
        if stat.S_ISLNK(st.st_mode):
            return "not_regular: a symbolic link (rings must be regular files)"
        if not stat.S_ISREG(st.st_mode):
            return "not_regular: not a regular file"
        mode = stat.S_IMODE(st.st_mode)
        seen = f"uid {st.st_uid}, gid {st.st_gid}, mode {mode:04o}"
        if mode & 0o007:
            return (f"permissions: mode {mode:04o} gives other users access ({seen}); rings must be 0600 "
                    "(or 0660 with --ring-group)")
        if mode & 0o070:
            if cfg.ring_group is None:
                return (f"permissions: mode {mode:04o} gives group access but no --ring-group is configured ({seen}); "
                        f"rings must be 0600, or run the exporter with --ring-group {st.st_gid} if that is the ring group")
            if st.st_gid != cfg.ring_group:
                return (f"group: group-accessible (mode {mode:04o}) by gid {st.st_gid}, configured ring group is "
                        f"{cfg.ring_group} ({seen}); set TENSORTRACE_RING_GID={cfg.ring_group} in the inference "
                        "container, or prepare the ring directory setgid with that group (`tensortrace ring-dir prepare`)")
            if mode & 0o060 != 0o060:
                return (f"permissions: mode {mode:04o}: a group-shared ring must be 0660 ({seen}); the exporter "
                        "stores the ring's tail and writes its control block")
            if st.st_uid in cfg.owner_uids:
                return ""
            why = dir_problem(dir_path or cfg.ring_dir, dir_st, cfg.ring_group) if dir_st is not None else ""
            return f"group: {why}" if why else ""
        if st.st_uid not in cfg.owner_uids:
            group = (f" or group-shared rings (0660) of gid {cfg.ring_group} (--ring-group)" if cfg.ring_group is not None
                     else "; to share rings with a group, set TENSORTRACE_RING_GID=<gid> in the inference container "
                          "and --ring-group <gid> here")
            return (f"owner: owned by uid {st.st_uid} ({seen}); this exporter reads rings of uids "
                    f"{','.join(map(str, cfg.owner_uids))} (--ring-owner-uids){group}")
        return ""

    def _permission_hint(self, path: str) -> str:
        """What the exporter saw and what to set, for a permission error on `path` (ring, lock or directory)."""
        d = self.cfg.ring_dir
        g = self.cfg.ring_group
        gid = str(g) if g is not None else "<ring gid>"
        return (f"{path}: {describe_path(path)}; ring dir {d}: {describe_path(d)}; this exporter: {describe_process()}. "
                f"The exporter needs read-write on the ring (a 0660 ring of group {gid} with {gid} in its "
                f"supplementary groups, or a 0600 ring of its own uid) and write access to the ring directory "
                f"(lock files; removing drained rings): prepare it with `tensortrace ring-dir prepare --path {d} "
                f"--gid {gid}`, set TENSORTRACE_RING_GID={gid} in the inference container and --ring-group {gid} "
                f"with supplementalGroups [{gid}] here")

    def _attach(self, path: str, st: os.stat_result, pod: PodDir | None = None, pod_path: str | None = None) -> None:
        ident = (st.st_dev, st.st_ino)
        name = os.path.join(os.path.basename(pod_path), os.path.basename(path)) if pod_path else os.path.basename(path)
        try:
            reader = RingReader.open(path)
        except RingLockedError as e:
            if any(r.path == path for r in self.rings.values()):
                return  # our reader of the previous generation still holds the lock; retry later
            self.known[ident] = "locked"
            log.error("ring skipped: %s (another exporter drains it)", e)
            return
        except RingFormatError as e:
            self.known[ident] = "quarantined"
            reason = "bad_version" if "version" in str(e) else "bad_magic" if "magic" in str(e) else "bad_header"
            log.error("ring quarantined: %s (%s); other rings keep flowing", e, reason)
            self.metrics.rings_quarantined.labels(reason).inc()
            self.quarantined[ident] = control_pb2.RingStatus(
                ring=name, path=path, state="quarantined", reason=f"{reason}: {e}",
                pod=pod.identity if pod is not None else "", node=self.cfg.node if pod is not None else "")
            return
        except RingNotRegularError as e:
            # a symbolic link (or other non-file) swapped in after the lstat check: O_NOFOLLOW refused it
            self._refuse((st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, "not_regular")
                         + _fingerprint(pod_path or self.cfg.ring_dir), path, f"not_regular: {e}")
            return
        except PermissionError as e:
            failed = e.filename or path
            what = "the consumer lock file" if str(failed).endswith(".consumer.lock") else "the ring read-write"
            self._refuse((st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid) + _fingerprint(pod_path or self.cfg.ring_dir),
                         path, f"permission_denied: cannot open {what} ({e.strerror}): {self._permission_hint(failed)}")
            return
        except (OSError, RingError) as e:
            log.warning("ring %s: cannot open: %s", path, e)
            return
        if reader.file_identity() != ident:
            reader.close()  # replaced between listing and opening; the next scan sees the new file
            return
        h = reader.header
        producer = mismatch = None
        if pod is not None:
            # The identity every record carries comes from where the ring is, never from its header.
            producer = pb.Producer(node=self.cfg.node, pod=pod.identity, pid=h.identity.pid,
                                   tp_rank=h.identity.tp_rank, generation=h.generation)
            if not pod.header_matches(h.identity.pod):
                mismatch = (f"{path}: the ring header claims pod {h.identity.pod!r} (node {h.identity.node!r}) but the "
                            f"ring is in the directory of pod {pod.identity!r}; nothing of it is published (under "
                            "either name), its frames are counted as dropped (identity_mismatch)")
        ring = RingDrain(reader, self.cfg, self.metrics, ident, name=name, producer=producer)
        ring.pod_name = pod.pod if pod is not None else ""
        if mismatch:
            ring.quarantine("identity_mismatch", mismatch, FrameDropReason.IDENTITY_MISMATCH)
        with self.lock:
            if ring.key in self.rings:  # same path and generation under a new inode: never mix
                log.error("ring %s: generation %d already attached from another file; skipped", path, ring.generation)
                reader.close()
                self.known[ident] = "duplicate generation"
                return
            self.rings[ring.key] = ring
            self.known[ident] = "attached"
            self.metrics.rings_attached.set(sum(1 for r in self.rings.values() if r.state in ("attached", "draining")))
        if mismatch:
            return
        log.info("ring attached: %s (pod %s, pid %d, rank %d, generation %d, %d frames pending)",
                 path, ring.producer.pod, h.identity.pid, h.identity.tp_rank, h.generation,
                 reader.producer_stats()["frames_committed"] - reader.frames_consumed)
        doc = self._control_for(ring)
        if doc is not None:
            self._write_control(ring, doc)

    def _check_lifecycle(self, ring: RingDrain, now: float) -> None:
        if ring.state in ("attached", "draining"):
            gone = not ring.reader.producer_alive() or ring.reader.producer_closed()
            ring.producer_alive = not gone
            if gone:
                ring.state = "draining"
                if ring.drained():  # nothing can be added any more: release the held STEP too
                    ring.release_acked(force_all=True)
                    self._detach(ring, now, "producer gone, drained")
        elif ring.state == "quarantined":
            if not ring.units and ring.reader is not None and ring.detached_at == 0.0:
                ring.update_counters()
                ring.detached_at = now
                with self.lock:
                    ring.close()
                    ring.reader_closed = True
        elif ring.state == "detached":
            if now - ring.detached_at >= self.cfg.cleanup_grace_s:
                self._remove(ring)

    def _detach(self, ring: RingDrain, now: float, why: str) -> None:
        ring.update_counters()
        with self.lock:
            ring.state = "detached"
            ring.detached_at = now
            ring.final_stats = self._ring_status(ring)
            ring.close()
            self.metrics.rings_attached.set(sum(1 for r in self.rings.values() if r.state in ("attached", "draining")))
        log.info("ring detached: %s (%s; %d records published)", ring.path, why, ring.records_out)

    def _remove(self, ring: RingDrain) -> None:
        with self.lock:
            self.rings.pop(ring.key, None)
        try:
            st = os.lstat(ring.path)
            if (st.st_dev, st.st_ino) == ring.inode:
                os.unlink(ring.path)
                if not any(r.path == ring.path for r in self.rings.values()):
                    try:
                        os.unlink(ring.path + ".consumer.lock")
                    except FileNotFoundError:
                        pass
                self.metrics.rings_removed.inc()
                log.info("ring removed: %s (producer gone, drained, grace %.0fs over)", ring.path, self.cfg.cleanup_grace_s)
        except FileNotFoundError:
            pass
        self.known.pop(ring.inode, None)
        self.metrics.forget_ring(ring.name)

    def _housekeeping(self) -> None:
        # kafka-python resolves every send within delivery_timeout_ms; one that does not (seen
        # after long broker outages) would hold its ring forever: abandon the producer, re-read.
        stuck_after = self.cfg.delivery_timeout_ms / 1000 + 10.0
        if self.publisher.inflight_messages and self.publisher.oldest_inflight_s() > stuck_after:
            log.warning("kafka: %d sends unresolved after %.0fs; abandoning the producer and re-reading "
                        "the rings from their tails (at-least-once)", self.publisher.inflight_messages, stuck_after)
            self.metrics.kafka_errors.labels("stuck_send").inc()
            self.publisher.reset()
            for ring in list(self.rings.values()):
                if not ring.units:
                    continue
                for u in ring.units:
                    if u.pending:
                        u.pending = 0
                        u.failed = True
                        ring.needs_rewind = True
                try:
                    ring.release_acked(force_all=ring.state == "quarantined")
                except Exception as e:  # per ring: the others are still re-read
                    self._ring_failed(ring, "releasing after abandoned sends", e)
        oldest = 0
        for ring in list(self.rings.values()):
            if ring.state not in ("attached", "draining"):
                continue
            try:
                ring.update_counters()
                head = ring.reader.head
                if head != ring.last_head:
                    ring.last_head, ring.last_head_change = head, time.monotonic()
                if not ring.units:
                    # an idle ring (no new frame for a while) is past its step: release the held STEP too
                    idle = time.monotonic() - ring.last_head_change >= self.cfg.idle_release_s
                    ring.release_acked(force_all=idle and ring.read_pos == head)
            except Exception as e:  # one ring's counters or idle release must not stop the others
                self._ring_failed(ring, "housekeeping (counters, idle release)", e)
                continue
            o = ring.oldest_undelivered_ns()
            if o and (not oldest or o < oldest):
                oldest = o
        self.metrics.oldest_undelivered_age.set(max(0.0, (time.time_ns() - oldest) / 1e9) if oldest else 0.0)

    # -- control ---------------------------------------------------------------------------
    def _control_for(self, ring: RingDrain) -> dict | None:
        c = self.ring_controls
        return (c.get(ring.name) or c.get(ring.producer.pod) or (c.get(ring.pod_name) if ring.pod_name else None)
                or self.default_control)

    def _write_control(self, ring: RingDrain, doc: dict) -> int:
        seq = ring.reader.write_control(doc)
        ring.control_seq = seq
        ring.control_json = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return seq

    def set_capture(self, doc: dict, targets: list[str]) -> list[control_pb2.RingControlResult]:
        """Write `doc` into the control block of the targeted rings (all when `targets` is empty)."""
        results = []
        with self.lock:
            if not targets:
                self.default_control = doc
                self.ring_controls.clear()
            else:
                for t in targets:
                    self.ring_controls[t] = doc
            matched = set()
            for ring in self.rings.values():
                if ring.state not in ("attached", "draining"):
                    continue
                names = {ring.name, ring.producer.pod} | ({ring.pod_name} if ring.pod_name else set())
                if targets and not names & set(targets):
                    continue
                matched.update(names)
                try:
                    seq = self._write_control(ring, doc)
                    results.append(control_pb2.RingControlResult(ring=ring.name, control_seq=seq))
                except (ValueError, OSError) as e:
                    results.append(control_pb2.RingControlResult(ring=ring.name, error=str(e)))
            for t in targets:
                if t not in matched:
                    results.append(control_pb2.RingControlResult(
                        ring=t, error="no attached ring with this file name or pod; applied when it appears"))
        log.info("control: %s -> %s", json.dumps(doc, sort_keys=True), ", ".join(targets) or "all rings")
        return results

    # -- status ----------------------------------------------------------------------------
    def _ring_status(self, ring: RingDrain) -> control_pb2.RingStatus:
        h = ring.reader.header
        stats = ring.reader.producer_stats()
        released = ring.frames_released_total()
        return control_pb2.RingStatus(
            ring=ring.name, path=ring.path, state=ring.state, reason=ring.reason,
            pod=ring.producer.pod, node=ring.producer.node, model_id=h.identity.model_id,
            pid=h.identity.pid, tp_rank=h.identity.tp_rank, generation=h.generation,
            fill=ring.reader.fill(), capacity=h.capacity, producer_alive=ring.producer_alive,
            frames_committed=stats["frames_committed"], frames_dropped_by_producer=stats["frames_dropped"],
            frames_released=released,
            frames_pending=max(0, stats["frames_committed"] - released),
            frames_dropped_by_reason=dict(ring.dropped),
            records_published=ring.records_out, bytes_published=ring.bytes_out,
            messages_published=ring.messages_out,
            records_per_second=ring.rates[0], bytes_per_second=ring.rates[1],
            control_seq=ring.control_seq, control_json=ring.control_json,
            oldest_undelivered_age_seconds=(max(0.0, (time.time_ns() - ring.oldest_undelivered_ns()) / 1e9)
                                            if ring.oldest_undelivered_ns() else 0.0))

    def status(self) -> control_pb2.ExporterStatus:
        connected = self.publisher.ready()  # may probe the network: outside the lock
        with self.lock:
            rings = []
            for ring in self.rings.values():
                if getattr(ring, "final_stats", None) is not None:
                    s = control_pb2.RingStatus()
                    s.CopyFrom(ring.final_stats)
                    s.state = ring.state
                    s.frames_dropped_by_reason.clear()
                    s.frames_dropped_by_reason.update(dict(ring.dropped))
                    rings.append(s)
                elif getattr(ring, "reader_closed", False):
                    rings.append(control_pb2.RingStatus(
                        ring=ring.name, path=ring.path, state=ring.state, reason=ring.reason,
                        generation=ring.generation, frames_dropped_by_reason=dict(ring.dropped),
                        records_published=ring.records_out, bytes_published=ring.bytes_out,
                        messages_published=ring.messages_out))
                else:
                    rings.append(self._ring_status(ring))
            rings.extend(self.quarantined.values())
            return control_pb2.ExporterStatus(
                kafka_connected=connected, topic=self.cfg.topic, ring_dir=self.cfg.ring_dir,
                rings=rings, inflight_messages=self.publisher.inflight_messages,
                inflight_bytes=self.publisher.inflight_bytes, kafka_errors=self.publisher.errors,
                default_control_json=json.dumps(self.default_control, sort_keys=True) if self.default_control else "",
                uptime_seconds=time.monotonic() - self._started)

    # -- shutdown --------------------------------------------------------------------------
    def shutdown(self, flush_timeout_s: float = 10.0) -> None:
        """Deliver what is in flight, release it, close everything."""
        self.publisher.flush(flush_timeout_s)
        self._handle_completions()
        self.publisher.close()
        with self.lock:
            for ring in self.rings.values():
                if ring.state in ("attached", "draining"):
                    ring.close()
            self.rings.clear()
        if self.control_server is not None:
            self.control_server.stop(grace=1)
