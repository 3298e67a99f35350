"""Who may write and read ring files across pods: the ring directory's owner, group and mode.

The agent runs as the inference container's uid (often root in SGLang images, or an arbitrary
uid on OpenShift); the exporter runs as a fixed non-root uid (10001). They share one thing: a
**ring group** (a gid). The model, end to end (docs/operations.md "Ring permissions"):

- the ring directory is `root:<gid>` mode `2770`: group members (agent and exporter) create and
  delete files in it, nobody else can, and the setgid bit makes every file created in it belong
  to `<gid>`, whatever the creator's primary group. `tensortrace ring-dir prepare` (the chart's
  init container, run as root) creates or fixes it; idempotent.
- the agent (`TENSORTRACE_RING_GID=<gid>`) creates its ring `0660` with group `<gid>` (a
  `fchown` where the directory did not already give it that group: root may, a non-root process
  must be a member of `<gid>`). Group write is needed: the exporter stores the ring's tail and
  writes its control block.
- the exporter (`--ring-group <gid>`, the gid in its supplementary groups) reads rings owned by
  `--ring-owner-uids` (owner-only `0600`), or rings of group `<gid>` mode `0660` whatever their
  owner, but only from a directory that other users cannot write (there, a file's group proves
  who made it). Anything else is refused with a reason that says what it saw and what to set.

Pod directories (docs/operations.md "Pod isolation and the threat model"): each inference pod
writes only into its own subdirectory of the ring directory, `<ring dir>/<namespace>_<pod>/` (in
Kubernetes a `subPathExpr: $(POD_NAMESPACE)_$(POD_NAME)` mount, so the pod sees nothing else; on a
plain host `<ring dir>/<pod>/`). The exporter takes the producer's pod from that name
(`parse_pod_dir`), never from the ring header, and `pod_dir_problem` says why a directory or a ring
in it must not be trusted: a pod directory owned by a non-root uid is that uid's, so a ring in it
owned by another uid is refused; a root-owned one (kubelet creates subPath directories as root,
with the ring directory's mode) relies on the mount for isolation.

Standard library only: the init container, the agent and the exporter all import it.

    >>> parse_mode("2770"), parse_mode("0o660"), parse_id("2000", "gid")
    (1528, 432, 2000)
    >>> parse_id("1.048576e+06", "gid")
    Traceback (most recent call last):
    ValueError: gid '1.048576e+06' is not a non-negative integer (a number rendered as a float, e.g. by Helm without `int`?)
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass

DEFAULT_DIR_MODE = 0o2770     # setgid, group rwx, nothing for others
SHARED_RING_MODE = 0o660      # owner + ring group read-write
PRIVATE_RING_MODE = 0o600     # owner only (no ring group configured)


def parse_id(value, what: str) -> int:
    """A uid or gid from a flag or environment variable: a non-negative decimal integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        text = str(value).strip()
        if not text.isdigit():
            hint = " (a number rendered as a float, e.g. by Helm without `int`?)" if any(c in text for c in ".eE") else ""
            raise ValueError(f"{what} {text!r} is not a non-negative integer{hint}")
        n = int(text)
    if n < 0 or n > 0xFFFFFFFE:
        raise ValueError(f"{what} {n} is out of range (0..4294967294)")
    return n


def parse_mode(value) -> int:
    """A permission mode, octal: `2770`, `02770`, `0o2770` (or an int, taken as is)."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        text = str(value).strip().lower()
        digits = text[2:] if text.startswith("0o") else text
        if not digits or any(c not in "01234567" for c in digits):
            raise ValueError(f"mode {value!r} is not an octal permission mode (e.g. 2770 or 0660)")
        mode = int(digits, 8)
    if mode & ~0o7777:
        raise ValueError(f"mode {value!r} has bits beyond 07777")
    return mode


def describe_process() -> str:
    """`uid 10001, gid 10001, groups 2000` — who this process is, for error messages."""
    groups = sorted(set(os.getgroups()) - {os.getegid()})
    return (f"uid {os.geteuid()}, gid {os.getegid()}, supplementary groups "
            f"{','.join(map(str, groups)) if groups else 'none'}")


def describe_stat(st: os.stat_result) -> str:
    """`owner uid 0, gid 2000, mode 2770`."""
    return f"owner uid {st.st_uid}, gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}"


def describe_path(path: str) -> str:
    try:
        return describe_stat(os.stat(path))
    except OSError as e:
        return f"cannot stat: {e.strerror}"


def ring_file_mode(gid: int | None, mode: int | None = None) -> int:
    """The mode the agent creates a ring with: `mode` if given, else 0660 with a ring group, else 0600."""
    if mode is not None:
        return mode
    return SHARED_RING_MODE if gid is not None else PRIVATE_RING_MODE


def ring_mode_problem(mode: int, gid: int | None) -> str:
    """Why `mode` cannot be a ring file's mode ("" when it can)."""
    if mode & 0o600 != 0o600:
        return f"ring mode {mode:04o} must give the owner read-write (0600)"
    if mode & ~0o660:
        return f"ring mode {mode:04o} gives more than owner and group read-write (other users or execute bits)"
    if mode & 0o060 and mode & 0o060 != 0o060:
        return (f"ring mode {mode:04o}: the group needs read-write (the exporter stores the ring's tail "
                "and writes its control block), so 0660")
    if mode & 0o060 and gid is None:
        return f"ring mode {mode:04o} shares the ring with a group but no ring gid is configured (TENSORTRACE_RING_GID)"
    return ""


def dir_problem(path: str, st: os.stat_result, ring_group: int | None) -> str:
    """Why rings of group `ring_group` must not be trusted in this directory ("" when they may)."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002:
        return (f"ring dir {path} is writable by every user ({describe_stat(st)}): anyone could plant a ring "
                f"of gid {ring_group} there; prepare it with `tensortrace ring-dir prepare --path {path} "
                f"--gid {ring_group}` (mode 2770)")
    if mode & 0o020 and st.st_gid != ring_group:
        return (f"ring dir {path} is group-writable for gid {st.st_gid}, not the ring group {ring_group} "
                f"({describe_stat(st)}); prepare it with `tensortrace ring-dir prepare --path {path} --gid {ring_group}`")
    return ""


def prepare_ring_dir(path: str, gid: int, mode: int = DEFAULT_DIR_MODE, uid: int | None = None) -> list[str]:
    """Create or fix the ring directory: owner `uid` (None: keep), group `gid`, `mode`. Idempotent:
    returns what it changed (empty when nothing). Raises ValueError for a mode that would let other
    users in or keep the group out, OSError (with what it saw) when it cannot.

        prepare_ring_dir("/run/tensortrace", gid=2000)     # ['created', ...] the first time, [] after
    """
    if mode & 0o002:
        raise ValueError(f"mode {mode:04o} lets every user write the ring directory; use 2770")
    if mode & 0o070 != 0o070:
        raise ValueError(f"mode {mode:04o}: the ring group needs rwx on the directory (agents create rings, "
                         "the exporter creates lock files and removes drained rings); use 2770")
    changes = []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.mkdir(path, 0o700)   # narrowed until owner, group and mode are set below
        changes.append("created")
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, f"{path} is not a directory (a symbolic link or a file); "
                                                "remove it or choose another ring directory")
    want_uid = st.st_uid if uid is None else uid
    if (st.st_uid, st.st_gid) != (want_uid, gid):
        try:
            os.chown(path, want_uid, gid, follow_symlinks=False)
        except PermissionError as e:
            raise PermissionError(e.errno, f"cannot give {path} ({describe_stat(st)}) to uid {want_uid} gid {gid}: "
                                           f"{e.strerror}; run this as root (the chart's init container: runAsUser 0 "
                                           "with capabilities CHOWN, FOWNER, FSETID)") from None
        changes.append(f"owner {st.st_uid}:{st.st_gid} -> {want_uid}:{gid}")
    st2 = os.lstat(path)
    if stat.S_IMODE(st2.st_mode) != mode:
        try:
            os.chmod(path, mode, follow_symlinks=True)
        except PermissionError as e:
            raise PermissionError(e.errno, f"cannot set mode {mode:04o} on {path} ({describe_stat(st2)}): "
                                           f"{e.strerror}; run this as root or as the directory's owner") from None
        got = stat.S_IMODE(os.lstat(path).st_mode)
        if got != mode:  # the kernel drops setgid for a caller outside the group without CAP_FSETID
            raise PermissionError(errno.EPERM, f"mode of {path} is {got:04o} after chmod {mode:04o}: the setgid bit "
                                               "was dropped; run as root with capability FSETID (or as a member of "
                                               f"gid {gid})")
        changes.append(f"mode {stat.S_IMODE(st2.st_mode):04o} -> {mode:04o}")
    return changes


def ensure_agent_ring_dir(path: str, gid: int | None) -> None:
    """The agent's side, at start-up (never on the inference thread): create the ring directory if
    it is missing (2770 with its group set to `gid`, else 0700); if it exists, check this process
    can create files in it, and say what to do when it cannot."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        mode = DEFAULT_DIR_MODE if gid is not None else 0o700
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
        except PermissionError as e:
            raise PermissionError(e.errno, f"cannot create ring directory {path} ({e.strerror}; parent "
                                           f"{describe_path(os.path.dirname(os.path.abspath(path)))}; this process "
                                           f"{describe_process()}): prepare it with `tensortrace ring-dir prepare "
                                           f"--path {path} --gid <ring gid>` (the chart's init container)") from None
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, f"ring directory {path} is not a directory")
    me = os.geteuid()
    if st.st_uid not in (0, me) and me != 0:
        # a plain-host pod directory belongs to the uid that made it: the exporter refuses rings of
        # another uid in it (owner_mismatch); say so now rather than capture into a ring nobody reads
        logging.getLogger("tensortrace.agent").warning(
            "ring directory %s is owned by uid %d, not this process (uid %d): if it is a pod directory, the "
            "exporter refuses this process's rings there (owner_mismatch); give each pod its own directory "
            "(docs/operations.md \"Pod isolation and the threat model\")", path, st.st_uid, me)
    if not os.access(path, os.W_OK | os.X_OK):
        hint = f" --gid {gid}" if gid is not None else " --gid <ring gid>"
        raise PermissionError(errno.EACCES, f"cannot create rings in {path} ({describe_stat(st)}; this process "
                                            f"{describe_process()}): prepare it with `tensortrace ring-dir prepare "
                                            f"--path {path}{hint}` and run the inference container in that group "
                                            "(securityContext.supplementalGroups), or as root")


# -- pod directories ---------------------------------------------------------------------------
# A Kubernetes namespace is a DNS label; a pod name a DNS subdomain: neither contains "_", so
# "<namespace>_<pod>" splits unambiguously. A plain-host pod name may also use upper case.
_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_POD_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]{0,251}[A-Za-z0-9])?")
HEADER_POD_BYTES = 64   # the ring header's pod field (ring/format.py): longer names are truncated there


@dataclass(frozen=True)
class PodDir:
    """Who a pod directory belongs to, from its name alone.

    >>> parse_pod_dir("prod_sglang-7d9f-x2x")
    PodDir(namespace='prod', pod='sglang-7d9f-x2x')
    >>> parse_pod_dir("sglang-0").identity, parse_pod_dir("prod_sglang-0").identity
    ('sglang-0', 'prod/sglang-0')
    """

    namespace: str
    pod: str

    @property
    def identity(self) -> str:
        """The pod as published in every record (Producer.pod): `<namespace>/<pod>`, or `<pod>`."""
        return f"{self.namespace}/{self.pod}" if self.namespace else self.pod

    def header_matches(self, header_pod: str) -> bool:
        """Does the pod name a producer wrote into its ring header agree with this directory? (The
        header stores at most 64 bytes of it.)"""
        return header_pod == self.pod.encode()[:HEADER_POD_BYTES].decode(errors="replace")


def parse_pod_dir(name: str) -> PodDir:
    """`<namespace>_<pod>` or `<pod>` -> PodDir; ValueError naming what is wrong.

    >>> parse_pod_dir("../x")
    Traceback (most recent call last):
    ValueError: pod directory name '../x' is not <namespace>_<pod> or <pod> (namespace: a DNS label; pod: letters, digits, '-' and '.', starting and ending with a letter or digit)
    """
    namespace, sep, pod = name.partition("_")
    if not sep:
        namespace, pod = "", name
    if (sep and not _NAMESPACE_RE.fullmatch(namespace)) or not _POD_RE.fullmatch(pod):
        raise ValueError(f"pod directory name {name!r} is not <namespace>_<pod> or <pod> (namespace: a DNS label; "
                         "pod: letters, digits, '-' and '.', starting and ending with a letter or digit)")
    return PodDir(namespace, pod)


def pod_dir_problem(path: str, st: os.stat_result, ring_group: int | None) -> str:
    """Why rings in the pod directory `path` (lstat `st`) must not be read ("" when they may):
    `reason: detail`, the reason being the refusal's metric label."""
    if stat.S_ISLNK(st.st_mode):
        return (f"pod_dir: {path} is a symbolic link; a pod directory must be a real directory "
                "(kubelet's subPathExpr mount or the agent creates it)")
    if not stat.S_ISDIR(st.st_mode):
        return f"pod_dir: {path} is not a directory"
    try:
        parse_pod_dir(os.path.basename(path))
    except ValueError as e:
        return f"pod_dir: {e}"
    why = dir_problem(path, st, ring_group)
    return f"pod_dir: {why.replace('ring dir', 'pod directory', 1)}" if why else ""


def ring_owner_problem(ring: str, ring_st: os.stat_result, pod_dir: str, dir_st: os.stat_result) -> str:
    """The owner rule ("" when it holds): a pod directory owned by a non-root uid belongs to that
    uid (the agent created it on a plain host), so every ring in it must be owned by that uid; a
    root-owned pod directory (kubelet's subPath directory, `ring-dir prepare`) admits rings of any
    uid, the mount being what keeps other pods out."""
    if dir_st.st_uid != 0 and ring_st.st_uid != dir_st.st_uid:
        return (f"owner_mismatch: {ring} is owned by uid {ring_st.st_uid}, its pod directory {pod_dir} by uid "
                f"{dir_st.st_uid}: a ring in a pod's directory must be that pod's (another uid wrote it there)")
    return ""
