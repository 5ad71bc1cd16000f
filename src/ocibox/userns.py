"""User namespaces for an unprivileged user, from Python: the id mappings and a way to run
a function as the namespace's root.

A rootless user owns only their own uid. With /etc/subuid and /etc/subgid ranges and the setuid
helpers newuidmap/newgidmap (Debian's uidmap package), a user namespace maps container root to
the user and container ids 1…N to the subordinate range, so an image's files can belong to
uid 1000 or 65534 on disk, as podman stores them. Without ranges (or helpers) the namespace
maps only root, and every file belongs to the user.

`run_as_root` forks a child, moves it into a new user namespace, maps it, and runs a function
there as uid 0: unpacking with real chown, and removing what such an unpack wrote.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ocibox.errors import OciboxError

CLONE_NEWUSER = 0x10000000


# Plain classes, not dataclasses or NamedTuples: `ocibox run` imports this module at every start.
class IdMap:
    def __init__(self, container_id: int, host_id: int, size: int) -> None:
        self.container_id, self.host_id, self.size = container_id, host_id, size

    def to_json(self) -> dict[str, int]:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"IdMap({self.container_id}, {self.host_id}, {self.size})"


class Mappings:
    def __init__(self, uids: tuple[IdMap, ...], gids: tuple[IdMap, ...]) -> None:
        self.uids, self.gids = uids, gids

    @property
    def single(self) -> bool:
        """Only container root is mapped: files of other owners show as nobody."""
        return len(self.uids) == 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mappings) and (self.uids, self.gids) == (other.uids, other.gids)

    def __repr__(self) -> str:
        return f"Mappings({self.uids!r}, {self.gids!r})"


def _ranges(path: str, user: str, uid: int) -> list[tuple[int, int]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)):
                    start, count = int(parts[1]), int(parts[2])
                    if count > 0:
                        out.append((start, count))
    except (OSError, ValueError):
        return []
    return out


def _chain(own: int, ranges: list[tuple[int, int]]) -> tuple[IdMap, ...]:
    """Container id 0 → `own`, then ids 1… → the subordinate `ranges`, one after the other."""
    maps = [IdMap(0, own, 1)]
    next_id = 1
    for start, count in ranges:
        maps.append(IdMap(next_id, start, count))
        next_id += count
    return tuple(maps)


def mappings() -> Mappings:
    """The mappings a rootless container of this user gets: root → the user, 1… → subordinate ids
    (when the user has ranges and the newuidmap/newgidmap helpers exist)."""
    import pwd
    import shutil

    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        return Mappings((IdMap(0, 0, 4294967295),), (IdMap(0, 0, 4294967295),))
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    sub_uids = _ranges("/etc/subuid", user, uid)
    sub_gids = _ranges("/etc/subgid", user, uid)
    if sub_uids and sub_gids and shutil.which("newuidmap") and shutil.which("newgidmap"):
        return Mappings(_chain(uid, sub_uids), _chain(gid, sub_gids))
    return Mappings((IdMap(0, uid, 1),), (IdMap(0, gid, 1),))


def _write_maps(pid: int, maps: Mappings) -> None:
    import subprocess

    if maps.single:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"0 {maps.uids[0].host_id} 1\n")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"0 {maps.gids[0].host_id} 1\n")
        return
    for tool, ids in (("newuidmap", maps.uids), ("newgidmap", maps.gids)):
        args = [tool, str(pid)]
        for m in ids:
            args += [str(m.container_id), str(m.host_id), str(m.size)]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise OciboxError(f"{tool} failed: {done.stderr.strip() or done.returncode}")


def run_as_root(fn: Callable[..., object], *args: object) -> object:
    """Run `fn(*args)` as root of a new user namespace with this user's mappings; return its
    result or re-raise its OciboxError. As real root, just call it."""
    if os.geteuid() == 0:
        return fn(*args)
    import ctypes
    import pickle

    maps = mappings()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(ready_r)
        os.close(go_w)
        os.close(result_r)
        status = 0
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWUSER) != 0:
                err = ctypes.get_errno()
                raise OciboxError(
                    f"cannot create a user namespace: {os.strerror(err)} "
                    "(is kernel.unprivileged_userns_clone or a security policy blocking it?)"
                )
            os.write(ready_w, b"1")
            if os.read(go_r, 1) != b"1":
                raise OciboxError("cannot map ids into the user namespace")
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            outcome: tuple[str, object] = ("ok", fn(*args))
        except OciboxError as exc:
            outcome, status = ("error", exc), 1
        except OSError as exc:  # as the CLI words it: "Permission denied (/path)"
            where = f" ({exc.filename})" if exc.filename else ""
            outcome, status = ("error", OciboxError(f"{exc.strerror or exc}{where}")), 1
        except BaseException as exc:  # noqa: BLE001 - everything must cross the pipe as one line
            outcome, status = ("error", OciboxError(f"{type(exc).__name__}: {exc}")), 1
        try:
            with os.fdopen(result_w, "wb") as f:
                pickle.dump(outcome, f)
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(go_r)
    os.close(result_w)
    try:
        if os.read(ready_r, 1) == b"1":
            try:
                _write_maps(pid, maps)
                os.write(go_w, b"1")
            except (OSError, OciboxError):
                os.write(go_w, b"0")
                raise
        with os.fdopen(result_r, "rb") as f:
            data = f.read()
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)
    if not data:
        raise OciboxError("the user-namespace helper process died")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    return value
