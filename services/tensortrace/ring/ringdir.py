"""`tensortrace ring-dir prepare --path DIR --gid GID [--mode 2770] [--uid UID]`: make the ring directory.

Kubernetes creates a hostPath as root, mode 0755: a non-root inference pod cannot create its ring
there and the exporter (uid 10001) cannot create its lock files. The chart's init container runs
this command as root once per node before the exporter starts; it creates the directory (or fixes
an existing one) as `UID:GID`, mode `2770` (setgid: every ring created there belongs to GID).
Idempotent: a second run changes nothing and says so. docs/operations.md "Ring permissions".

Pod directories (`<ring dir>/<namespace>_<pod>/`, one per inference pod; docs/operations.md "Pod
isolation and the threat model") are made by kubelet for the pod's `subPathExpr` mount, as root with
the ring directory's mode: `root:GID 2770` once the directory is prepared. A pod scheduled before the
node's exporter prepared it gets `root:root 0755`, which its non-root agent cannot write: `prepare`
also gives every existing pod directory the group and mode (its owner kept), so such a pod, still
in its wait-for-the-ring-directory init container, can start capturing.

    $ tensortrace ring-dir prepare --path /run/tensortrace --gid 2000
    ring dir /run/tensortrace: created; owner 0:0 -> 0:2000; mode 0700 -> 2770 (now owner uid 0, gid 2000, mode 2770)
    $ tensortrace ring-dir prepare --path /run/tensortrace --gid 2000
    ring dir /run/tensortrace: unchanged (owner uid 0, gid 2000, mode 2770)

`tensortrace ring-dir check --path DIR [--gid GID]` prints what a process sees there (the directory
and every ring's owner, group and mode, this process's uid and groups, whether it can open each
ring read-write, pod directory by pod directory, and what the exporter would refuse) and exits 1 on
a problem: run it in the exporter's container when rings are refused.

Standard library only (the init container runs it from the slim exporter image).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from tensortrace.ring.permissions import (DEFAULT_DIR_MODE, describe_path, describe_process, describe_stat,
                                          dir_problem, parse_id, parse_mode, parse_pod_dir, pod_dir_problem,
                                          prepare_ring_dir, ring_owner_problem)


def _id(what: str):
    def parse(text: str) -> int:
        try:
            return parse_id(text, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensortrace ring-dir", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="create or fix the ring directory (owner, group, setgid mode); idempotent")
    prep.add_argument("--path", required=True, help="the ring directory (the hostPath mount)")
    prep.add_argument("--gid", required=True, type=_id("--gid"), help="the ring group shared by agents and the exporter")
    prep.add_argument("--mode", type=_mode, default=DEFAULT_DIR_MODE, help="octal directory mode (default 2770)")
    prep.add_argument("--uid", type=_id("--uid"), default=None, help="directory owner (default: keep the current owner)")
    chk = sub.add_parser("check", help="print what this process sees in the ring directory; exit 1 on a problem")
    chk.add_argument("--path", required=True)
    chk.add_argument("--gid", type=_id("--gid"), default=None, help="the ring group expected")
    return p


def prepare(path: str, gid: int, mode: int, uid: int | None) -> int:
    try:
        changes = prepare_ring_dir(path, gid, mode, uid)
    except (OSError, ValueError) as e:
        print(f"tensortrace ring-dir prepare: {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    now = describe_path(path)
    print(f"ring dir {path}: {'; '.join(changes)} (now {now})" if changes else f"ring dir {path}: unchanged ({now})")
    rc = 0
    for sub in _pod_dirs(path):
        try:
            changes = prepare_ring_dir(sub, gid, mode, None)
        except (OSError, ValueError) as e:
            print(f"tensortrace ring-dir prepare: {sub}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            rc = 1
            continue
        if changes:
            print(f"pod dir {sub}: {'; '.join(changes)} (now {describe_path(sub)})")
    return rc


def _pod_dirs(path: str) -> list[str]:
    """The real (not symlinked) subdirectories of the ring directory whose names are pod directory names."""
    out = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        try:
            parse_pod_dir(name)
        except ValueError:
            continue
        if stat.S_ISDIR(os.lstat(sub).st_mode):
            out.append(sub)
    return out


def check(path: str, gid: int | None) -> int:
    problems = []
    print(f"this process: {describe_process()}")
    try:
        dst = os.stat(path)
    except OSError as e:
        print(f"ring dir {path}: {e.strerror}")
        return 1
    print(f"ring dir {path}: {describe_stat(dst)}")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        problems.append(f"{path}: this process cannot list and create files here")
    if gid is not None:
        if dst.st_gid != gid or not dst.st_mode & stat.S_ISGID:
            problems.append(f"{path}: not setgid with group {gid}: run `tensortrace ring-dir prepare --path {path} --gid {gid}`")
        why = dir_problem(path, dst, gid)
        if why:
            problems.append(why)
        if gid not in os.getgroups() and os.getegid() != gid and os.geteuid() != 0:
            problems.append(f"this process is not in group {gid}: add it to the pod's supplementalGroups")
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(".ring"))
    except OSError as e:
        names = []
        problems.append(f"{path}: cannot list ({e.strerror})")
    for n in names:
        p = os.path.join(path, n)
        st = os.lstat(p)
        ok = os.access(p, os.R_OK | os.W_OK)
        print(f"  {n}: {describe_stat(st)}; {'read-write' if ok else 'NOT readable-writable'} by this process; "
              "flat (directly in the ring dir): read only by an exporter with --allow-flat-rings")
        if not ok:
            problems.append(f"{p}: this process cannot open it read-write")
    try:
        subs = [os.path.join(path, n) for n in sorted(os.listdir(path))
                if not n.endswith(".ring") and not n.startswith(".") and os.path.isdir(os.path.join(path, n))]
    except OSError:
        subs = []
    for sub in subs:
        sst = os.lstat(sub)
        why = pod_dir_problem(sub, sst, gid)
        try:
            who = parse_pod_dir(os.path.basename(sub)).identity
        except ValueError:
            who = "?"
        print(f"  {os.path.basename(sub)}/ (pod {who}): {describe_stat(sst)}")
        if why:
            problems.append(why)
            continue
        try:
            rings = sorted(n for n in os.listdir(sub) if n.endswith(".ring"))
        except OSError as e:
            problems.append(f"{sub}: cannot list ({e.strerror})")
            continue
        for n in rings:
            p = os.path.join(sub, n)
            st = os.lstat(p)
            ok = os.access(p, os.R_OK | os.W_OK)
            print(f"    {n}: {describe_stat(st)}; {'read-write' if ok else 'NOT readable-writable'} by this process")
            if not ok:
                problems.append(f"{p}: this process cannot open it read-write")
            why = ring_owner_problem(p, st, sub, sst)
            if why:
                problems.append(why)
    for line in problems:
        print(f"problem: {line}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "prepare":
        return prepare(args.path, args.gid, args.mode, args.uid)
    return check(args.path, args.gid)


if __name__ == "__main__":
    sys.exit(main())
