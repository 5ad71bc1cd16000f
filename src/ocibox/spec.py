"""The OCI runtime config.json of a container: image config + run options, with Docker's semantics.

This is the one place that turns an image into a runtime configuration (`ocibox unpack` bundles,
`ocibox run` containers, compiled executables). What it follows:

- process args: Entrypoint + Cmd; a COMMAND replaces Cmd; `--entrypoint` replaces Entrypoint and
  clears Cmd (docker run). Env: the image's, then the user's (same key: the user's wins); PATH
  defaults to Docker's when the image sets none; HOSTNAME and HOME are added as Docker does.
  WorkingDir defaults to "/". User: `name`, `uid`, `name:group`, `uid:gid`, resolved against the
  rootfs' /etc/passwd and /etc/group (supplementary groups too).
- Docker's default capabilities, masked and read-only paths, default mounts (/proc /dev /dev/pts
  /dev/shm /dev/mqueue /sys), RLIMIT_NOFILE, namespaces pid ipc uts mount, + user when rootless,
  + network with `--network none`.
- rootless: a user namespace mapping the caller to root and 1… to the user's subordinate ids when
  there are (ocibox.userns.mappings, as the cached rootfs is unpacked), or the given mappings;
  /sys bind-mounted (sysfs can't be mounted without a network namespace of one's own), no gid= on
  devpts, and resources passed as asked: the runtime refuses them where the user has no delegated cgroup.
- annotations like umoci's: org.opencontainers.image.{os,architecture,author,created,stopSignal,
  exposedPorts}, the image labels, and ocibox.volumes for the image's Volumes.
"""

from __future__ import annotations

import os

from ocibox.errors import OciboxError

# Types for annotations only: `ocibox run` imports this module at every start, and pathlib and
# typing would add to it for nothing (the idiom the standard library itself uses).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# moby's oci/caps/defaults.go DefaultCapabilities
DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

# moby's oci/defaults.go
MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


class RunOptions:
    """What `docker run` flags can change. None means "as the image says".

    A plain class rather than a dataclass: `ocibox run` imports this module on every start, and
    the dataclasses module alone costs more than the rest of the run path (see run.py)."""

    def __init__(
        self,
        *,
        args: list[str] | None = None,  # COMMAND…: replaces Cmd
        entrypoint: list[str] | None = None,  # --entrypoint: replaces Entrypoint, clears Cmd
        env: list[str] | None = None,  # K=V, after the image's
        workdir: str | None = None,
        user: str | None = None,
        hostname: str | None = None,
        volumes: list[tuple[str, str, bool]] | None = None,  # (host, container, read_only)
        tmpfs: list[str] | None = None,  # "/path[:options]"
        read_only: bool = False,
        network: str = "host",  # "host" or "none"
        memory: int | None = None,  # bytes
        cpus: float | None = None,
        pids_limit: int | None = None,
        ulimits: list[tuple[str, int, int]] | None = None,  # (name, soft, hard)
        terminal: bool = False,
        rootless: bool = False,
        uid_mappings: list[dict[str, int]] | None = None,
        gid_mappings: list[dict[str, int]] | None = None,
        files: dict[str, str] | None = None,  # container path -> host file (bind, rw)
        annotations: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.entrypoint = entrypoint
        self.env = env or []
        self.workdir = workdir
        self.user = user
        self.hostname = hostname
        self.volumes = volumes or []
        self.tmpfs = tmpfs or []
        self.read_only = read_only
        self.network = network
        self.memory = memory
        self.cpus = cpus
        self.pids_limit = pids_limit
        self.ulimits = ulimits or []
        self.terminal = terminal
        self.rootless = rootless
        self.uid_mappings = uid_mappings
        self.gid_mappings = gid_mappings
        self.files = files or {}
        self.annotations = annotations or {}

    def __repr__(self) -> str:
        return f"RunOptions({vars(self)!r})"


# --- users -----------------------------------------------------------------------------------


def _read_db(rootfs: Path | None, name: str) -> list[list[str]]:
    """Rows of the rootfs' /etc/passwd or /etc/group, read without following symlinks out of it.

    The common case (a real /etc folder and file) is opened component by component with
    O_NOFOLLOW; where the image links them elsewhere, the link is resolved inside the root by
    ocibox.layers' resolver."""
    if rootfs is None:
        return []
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        try:
            dir_fd = os.open("etc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            return []
        except OSError:  # ELOOP/ENOTDIR: a symlink on the way
            fd = _open_in_root(root_fd, name)
        with open(fd, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []
    finally:
        os.close(root_fd)


def _open_in_root(root_fd: int, name: str) -> int:
    from ocibox.layers import _Openat2, _Resolver

    opener = _Openat2()
    resolver = _Resolver(root_fd, opener if opener.available else None)
    dir_fd = resolver.open_dir(["etc"], create=False)
    try:
        if opener.available:
            return opener.open(dir_fd, name, os.O_RDONLY | os.O_CLOEXEC, 0x10)
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


class User:
    def __init__(self, uid: int, gid: int, additional_gids: list[int], home: str) -> None:
        self.uid, self.gid, self.additional_gids, self.home = uid, gid, additional_gids, home

    def __eq__(self, other: object) -> bool:
        return isinstance(other, User) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"User({vars(self)!r})"


def resolve_user(rootfs: Path | None, spec: str | None) -> User:
    """Docker's `--user`: name|uid[:group|gid], looked up in the rootfs' /etc/passwd and /etc/group."""
    spec = spec or ""
    user_part, _, group_part = spec.partition(":")
    passwd = _read_db(rootfs, "passwd")
    uid, gid, home, name = 0, 0, "/", "root"
    found = None
    if user_part == "":
        found = next((r for r in passwd if len(r) >= 7 and r[2] == "0"), None)
    elif user_part.isdigit():
        uid = int(user_part)
        found = next((r for r in passwd if len(r) >= 7 and r[2] == user_part), None)
    else:
        found = next((r for r in passwd if len(r) >= 7 and r[0] == user_part), None)
        if found is None:
            raise OciboxError(f"unable to find user {user_part}: no matching entries in passwd file")
    if found is not None:
        name = found[0]
        try:
            uid, gid = int(found[2]), int(found[3])
        except ValueError:
            raise OciboxError(f"malformed /etc/passwd entry for {found[0]!r}") from None
        home = found[5] or "/"
    if user_part.isdigit() and found is None:
        name = ""
    groups = _read_db(rootfs, "group")
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            row = next((r for r in groups if len(r) >= 3 and r[0] == group_part), None)
            if row is None:
                raise OciboxError(f"unable to find group {group_part}: no matching entries in group file")
            if not row[2].isdigit():
                raise OciboxError(f"malformed /etc/group entry for {group_part!r}")
            gid = int(row[2])
    extra: list[int] = []
    if name and not group_part:
        for row in groups:
            if len(row) >= 4 and name in row[3].split(",") and row[2].isdigit():
                g = int(row[2])
                if g != gid and g not in extra:
                    extra.append(g)
    if not all(0 <= i <= _MAX_ID for i in (uid, gid, *extra)):
        # as docker says it; the runtime's 32-bit ids would wrap 4294967296 round to root
        raise OciboxError(f"invalid user {spec!r}: uids and gids must be in range 0-{_MAX_ID}")
    return User(uid, gid, extra, home)


_MAX_ID = 2147483647


# --- the config ------------------------------------------------------------------------------


def _env(image_env: list[str], user_env: list[str], extra: dict[str, str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*image_env, *user_env]:
        key, eq, value = item.partition("=")
        merged[key] = item if eq else key + "="
    if "PATH" not in merged:
        merged = {"PATH": DEFAULT_PATH, **merged}
    for key, value in extra.items():
        merged.setdefault(key, f"{key}={value}")
    return list(merged.values())


def _mounts(opts: RunOptions) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
            + ([] if opts.rootless else ["gid=5"]),
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
    ]
    if opts.rootless and opts.network != "none":
        mounts.append(
            {
                "destination": "/sys",
                "type": "none",
                "source": "/sys",
                "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
            }
        )
    else:
        mounts.append(
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            }
        )
    # No /sys/fs/cgroup mount: without a cgroup namespace a fresh cgroup mount is refused on
    # cgroup v1/hybrid hosts ("busy"), and runtimes that offer it emulate it with binds.
    for dest, source in opts.files.items():
        mounts.append(
            {"destination": dest, "type": "bind", "source": source, "options": ["rbind", "rprivate"]}
        )
    for host, dest, read_only in opts.volumes:
        mounts.append(
            {
                "destination": dest,
                "type": "bind",
                "source": host,
                "options": ["rbind", "rprivate", "ro" if read_only else "rw"],
            }
        )
    for item in opts.tmpfs:
        dest, _, extra = item.partition(":")
        if not dest.startswith("/"):
            raise OciboxError(f"invalid --tmpfs {item!r}: the path must be absolute")
        if dest.strip("/") == "":
            raise OciboxError(f"invalid --tmpfs {item!r}: a tmpfs can't replace the image's root")
        options = ["nosuid", "nodev", "noexec"]
        for opt in filter(None, extra.split(",")):
            if opt == "exec":
                options.remove("noexec")
            elif opt not in options:
                options.append(opt)
        mounts.append({"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": options})
    return mounts


def _rlimits(opts: RunOptions) -> list[dict[str, Any]]:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = 1048576 if hard == resource.RLIM_INFINITY else min(hard, 1048576)
    limits = {"RLIMIT_NOFILE": (nofile, nofile)}
    for name, soft, hard_limit in opts.ulimits:
        limits["RLIMIT_" + name.upper()] = (soft, hard_limit)
    return [{"type": key, "soft": soft, "hard": hard_value} for key, (soft, hard_value) in limits.items()]


def _resources(opts: RunOptions) -> dict[str, Any] | None:
    # Rootless too: the runtime applies the limits where it has a delegated cgroup, and refuses
    # with a message saying why where it has none. A limit is never dropped silently.
    wanted = opts.memory is not None or opts.cpus is not None or opts.pids_limit is not None
    if opts.rootless and not wanted:
        return None
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if opts.memory is not None:
        resources["memory"] = {"limit": opts.memory}
    if opts.cpus is not None:
        resources["cpu"] = {"quota": int(opts.cpus * 100000), "period": 100000}
    if opts.pids_limit is not None:
        resources["pids"] = {"limit": opts.pids_limit}
    return resources


def _annotations(image_config: dict[str, Any], opts: RunOptions) -> dict[str, str]:
    cfg = image_config.get("config") or {}
    out: dict[str, str] = {}
    for key, value in (cfg.get("Labels") or {}).items():
        out[key] = str(value)
    for key, field_name in (
        ("os", "os"),
        ("architecture", "architecture"),
        ("author", "author"),
        ("created", "created"),
    ):
        if image_config.get(field_name):
            out[f"org.opencontainers.image.{key}"] = str(image_config[field_name])
    if cfg.get("StopSignal"):
        out["org.opencontainers.image.stopSignal"] = cfg["StopSignal"]
    if cfg.get("ExposedPorts"):
        out["org.opencontainers.image.exposedPorts"] = ",".join(sorted(cfg["ExposedPorts"]))
    if cfg.get("Volumes"):
        out["ocibox.volumes"] = ",".join(sorted(cfg["Volumes"]))
    out.update(opts.annotations)
    return out


def runtime_config(
    image_config: dict[str, Any], opts: RunOptions, rootfs: Path | None = None
) -> dict[str, Any]:
    """config.json for `opts` on an image whose config (the JSON document) is `image_config`.
    `rootfs` is where users and groups are looked up; the config's root.path is "rootfs"."""
    cfg = image_config.get("config") or {}
    entrypoint = list(opts.entrypoint) if opts.entrypoint is not None else list(cfg.get("Entrypoint") or [])
    if opts.args:
        cmd = list(opts.args)
    elif opts.entrypoint is not None:
        cmd = []
    else:
        cmd = list(cfg.get("Cmd") or [])
    args = entrypoint + cmd
    if not args:
        raise OciboxError("no command specified: the image has no Entrypoint or Cmd; give one")
    user = resolve_user(rootfs, opts.user if opts.user is not None else cfg.get("User"))
    hostname = opts.hostname or "ocibox"
    extra_env = {"HOSTNAME": hostname, "HOME": user.home}
    if opts.terminal:
        extra_env["TERM"] = "xterm"
    caps = list(DEFAULT_CAPS)
    process: dict[str, Any] = {
        "terminal": opts.terminal,
        "user": {
            "uid": user.uid,
            "gid": user.gid,
            **({"additionalGids": user.additional_gids} if user.additional_gids else {}),
        },
        "args": args,
        "env": _env(list(cfg.get("Env") or []), opts.env, extra_env),
        "cwd": opts.workdir or cfg.get("WorkingDir") or "/",
        "capabilities": {
            "bounding": caps,
            "effective": caps if user.uid == 0 else [],
            "permitted": caps if user.uid == 0 else [],
        },
        "rlimits": _rlimits(opts),
        "noNewPrivileges": False,
    }
    if not process["cwd"].startswith("/"):
        process["cwd"] = "/" + process["cwd"]
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if opts.network == "none":
        namespaces.append({"type": "network"})
    elif opts.network != "host":
        raise OciboxError(f"unsupported --network {opts.network!r}: use host or none")
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if opts.rootless:
        namespaces.append({"type": "user"})
        if opts.uid_mappings is None or opts.gid_mappings is None:
            from ocibox import userns

            maps = userns.mappings()  # the same ranges the cached rootfs was unpacked with
            if os.geteuid() == 0:
                maps = userns.Mappings((userns.IdMap(0, 0, 1),), (userns.IdMap(0, 0, 1),))
        linux["uidMappings"] = opts.uid_mappings or [m.to_json() for m in maps.uids]
        linux["gidMappings"] = opts.gid_mappings or [m.to_json() for m in maps.gids]
    resources = _resources(opts)
    if resources is not None:
        linux["resources"] = resources
    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": "rootfs", "readonly": opts.read_only},
        "hostname": hostname,
        "mounts": _mounts(opts),
        "linux": linux,
    }
    annotations = _annotations(image_config, opts)
    if annotations:
        config["annotations"] = annotations
    return config
