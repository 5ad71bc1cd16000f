"""`ocibox run`: from an image (or a bundle folder) to a running container.

    image ──store/pull──► cached read-only rootfs ──spec──► containers/<id>/config.json
                                                              │  + hosts, hostname, resolv.conf
                                                              ▼
                                         ocibox-runtime run --bundle containers/<id> --upper …

The container's writable layer lives in `containers/<id>/layer` (upper + work of an overlay the
runtime lays over the shared rootfs); `--rm` removes the folder when the container ends. Flags
are parsed here from docker's syntax into plain values; spec.py turns them into config.json.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ocibox.errors import NotFound, OciboxError

FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$")
_ULIMITS = {
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc",
    "rss", "rtprio", "rttime", "sigpending", "stack", "as",
}


@dataclass
class RunRequest:
    """What the user asked for, as `docker run` spells it."""

    image: str
    command: list[str] = field(default_factory=list)
    rm: bool = False
    env: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    entrypoint: str | None = None
    hostname: str | None = None
    interactive: bool = False
    tty: bool = False
    network: str = "host"
    read_only: bool = False
    memory: str | None = None
    cpus: str | None = None
    pids_limit: int | None = None
    ulimits: list[str] = field(default_factory=list)
    name: str | None = None
    platform: str | None = None
    pull: str = "missing"
    quiet: bool = False


@dataclass(frozen=True)
class Volume:
    source: str
    destination: str
    read_only: bool = False


# --- docker's flag syntax ------------------------------------------------------------------------


def parse_env(items: list[str], env_files: list[str], environ: Mapping[str, str]) -> list[str]:
    """`-e K=V`, `-e K` (from the caller's environment, dropped if unset) and `--env-file`."""
    out: list[str] = []
    lines: list[str] = []
    for path in env_files:
        try:
            with open(path, encoding="utf-8") as f:
                lines += [ln.rstrip("\n") for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as exc:
            raise OciboxError(f"cannot read env file {path}: {exc.strerror}") from None
    for item in [*lines, *items]:
        key, eq, _ = item.partition("=")
        if not key.strip() or " " in key.strip():
            raise OciboxError(f"invalid environment variable {item!r}")
        if eq:
            out.append(item)
        elif key in environ:
            out.append(f"{key}={environ[key]}")
    return out


def parse_volume(text: str, cwd: str, anonymous_dir: Callable[[], str]) -> Volume:
    """`HOST:CTR[:ro|rw]` (a relative HOST is taken from the working directory and created if
    missing, as docker creates bind sources), or `CTR` alone for an anonymous volume."""
    parts = text.split(":")
    options: list[str] = []
    if len(parts) >= 2 and parts[-1] and all(o in ("ro", "rw", "z", "Z", "rprivate", "private", "rslave",
                                                  "slave", "rshared", "shared", "nocopy")
                                             for o in parts[-1].split(",")):
        options = parts[-1].split(",")
        parts = parts[:-1]
    if len(parts) == 1:
        source, dest = anonymous_dir(), parts[0]
    elif len(parts) == 2:
        source, dest = parts
        if not source:
            raise OciboxError(f"invalid volume {text!r}: empty host path")
        source = os.path.normpath(os.path.join(cwd, os.path.expanduser(source)))
        if not os.path.exists(source):
            try:
                os.makedirs(source, exist_ok=True)
            except OSError as exc:
                raise OciboxError(f"cannot create volume source {source}: {exc.strerror}") from None
    else:
        raise OciboxError(f"invalid volume {text!r}: expected HOST:CONTAINER[:ro]")
    if not dest.startswith("/"):
        raise OciboxError(f"invalid volume {text!r}: the container path must be absolute")
    return Volume(source, os.path.normpath(dest), "ro" in options)


def parse_size(text: str, flag: str) -> int:
    """Docker's sizes: `32m`, `1g`, `512k`, `1073741824` (bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise OciboxError(f"invalid {flag} {text!r}: use a size such as 512m or 2g")
    number, unit = float(match[1]), match[2].lower()
    return int(number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


def parse_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0 or value > os.cpu_count() * 1000:  # type: ignore[operator]
        raise OciboxError(f"invalid --cpus {text!r}: use a positive number such as 0.5 or 2")
    return value


def parse_ulimit(text: str) -> tuple[str, int, int]:
    """`nofile=1024[:2048]`, as docker takes it; -1 is unlimited."""
    name, eq, values = text.partition("=")
    if not eq or name not in _ULIMITS:
        raise OciboxError(f"invalid --ulimit {text!r}: expected NAME=SOFT[:HARD] with NAME one of "
                          + ", ".join(sorted(_ULIMITS)))
    soft_text, _, hard_text = values.partition(":")
    try:
        soft = int(soft_text)
        hard = int(hard_text) if hard_text else soft
    except ValueError:
        raise OciboxError(f"invalid --ulimit {text!r}: limits must be numbers") from None
    soft = 2**64 - 1 if soft < 0 else soft
    hard = 2**64 - 1 if hard < 0 else hard
    if soft > hard:
        raise OciboxError(f"invalid --ulimit {text!r}: the soft limit is above the hard limit")
    return name, soft, hard


# --- the container folder ------------------------------------------------------------------------


def _etc_files(folder: Path, hostname: str, network: str) -> dict[str, str]:
    """hosts, hostname and resolv.conf for the container, bind-mounted read-write like docker's."""
    files = {}
    (folder / "hostname").write_text(hostname + "\n")
    files["/etc/hostname"] = str(folder / "hostname")
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    if network == "host":
        try:
            with open("/etc/hosts") as f:
                hosts = f.read()
        except OSError:
            pass
    hosts += f"127.0.1.1\t{hostname}\n"
    (folder / "hosts").write_text(hosts)
    files["/etc/hosts"] = str(folder / "hosts")
    resolv = ""
    if network == "host":
        try:
            with open("/etc/resolv.conf") as f:
                resolv = f.read()
        except OSError:
            resolv = ""
    (folder / "resolv.conf").write_text(resolv)
    files["/etc/resolv.conf"] = str(folder / "resolv.conf")
    return files


def runtime_binary() -> str:
    """$OCIBOX_RUNTIME, the one installed beside the package, or the repository's build."""
    if path := os.environ.get("OCIBOX_RUNTIME"):
        return path
    here = Path(__file__).resolve().parent
    for candidate in (here / "libexec" / "ocibox-runtime", here.parent.parent / "runtime" / "ocibox-runtime"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("ocibox-runtime")
    if found:
        return found
    raise OciboxError("the ocibox runtime is missing: build it with `make -C runtime` or set OCIBOX_RUNTIME")


def _remove(path: Path) -> None:
    """Remove a container folder; files that the container's other users own need the namespace."""
    from ocibox.store import remove_tree

    try:
        remove_tree(path)
    except OSError:
        from ocibox import userns

        userns.run_as_root(remove_tree, path)


def _name_taken(containers: Path, name: str) -> bool:
    for state in containers.glob("*/state.json"):
        try:
            if json.loads(state.read_text()).get("Name") == name:
                return True
        except (OSError, ValueError):
            continue
    return False


# --- run -------------------------------------------------------------------------------------------


def run(req: RunRequest) -> int:
    from ocibox import spec
    from ocibox.store import Store

    store = Store.default().ensure()
    bundle = Path(req.image)
    if (bundle / "config.json").is_file():
        return _run_bundle(store, bundle.resolve(), req)
    image = _image(store, req)
    from ocibox.unpack import ensure_rootfs

    rootfs = ensure_rootfs(store, image)
    store.mark_used(image.manifest_digest)
    if req.name and _name_taken(store.containers_dir, req.name):
        raise OciboxError(f"the container name {req.name!r} is already in use")
    cid = secrets.token_hex(32)
    folder = store.containers_dir / cid
    folder.mkdir(mode=0o700)
    try:
        # Docker: the host's name on the host network, else the container ID's prefix.
        hostname = req.hostname or (os.uname().nodename if req.network == "host" else cid[:12])
        anonymous = iter(range(1 << 30))

        def anonymous_dir() -> str:
            path = folder / "volumes" / str(next(anonymous))
            path.mkdir(parents=True)
            return str(path)

        volumes = [parse_volume(v, os.getcwd(), anonymous_dir) for v in req.volumes]
        rootless = os.geteuid() != 0
        maps = None
        if rootless:
            from ocibox import userns

            maps = userns.mappings()
        opts = spec.RunOptions(
            args=req.command or None,
            entrypoint=None if req.entrypoint is None else ([req.entrypoint] if req.entrypoint else []),
            env=parse_env(req.env, req.env_files, os.environ),
            workdir=req.workdir,
            user=req.user,
            hostname=hostname,
            volumes=[(v.source, v.destination, v.read_only) for v in volumes],
            tmpfs=req.tmpfs,
            read_only=req.read_only,
            network=req.network,
            memory=parse_size(req.memory, "--memory") if req.memory else None,
            cpus=parse_cpus(req.cpus) if req.cpus else None,
            pids_limit=req.pids_limit,
            ulimits=[parse_ulimit(u) for u in req.ulimits],
            terminal=req.tty,
            rootless=rootless,
            uid_mappings=[m.to_json() for m in maps.uids] if maps else None,
            gid_mappings=[m.to_json() for m in maps.gids] if maps else None,
            files=_etc_files(folder, hostname, req.network),
        )
        config = spec.runtime_config(image.config.raw, opts, rootfs=rootfs)
        config["root"] = {"path": str(rootfs), "readonly": req.read_only}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        state = {"Id": cid, "Name": req.name or "", "Image": image.name, "ImageId": image.id,
                 "Created": time.time(), "Status": "running", "Command": config["process"]["args"]}
        (folder / "state.json").write_text(json.dumps(state))
        status = _start(folder, cid, upper=folder / "layer")
        state.update(Status="exited", ExitCode=status, Finished=time.time())
        (folder / "state.json").write_text(json.dumps(state))
        return status
    finally:
        if req.rm:
            _remove(folder)


def _image(store, req: RunRequest):
    """The stored image, pulled first when missing (or always, with --pull always)."""
    from ocibox import reference

    if req.pull != "always":
        try:
            return store.load_image(req.image)
        except NotFound:
            if req.pull == "never":
                raise
    from ocibox.image import Platform
    from ocibox.progress import Progress
    from ocibox.transfer import pull

    ref = reference.parse(req.image)
    progress = Progress.auto(quiet=req.quiet, stream=sys.stderr)
    if req.pull != "always":
        progress.message(f"Unable to find image '{ref.familiar}' locally")
    platform = Platform.parse(req.platform) if req.platform else None
    result = pull(ref, store, platform=platform, progress=progress)
    return store.load_image(result.name)


def _run_bundle(store, bundle: Path, req: RunRequest) -> int:
    """A bundle made by `ocibox unpack` (or by hand): run its config as it is; a COMMAND replaces
    its args. Writes go to a layer that `--rm` throws away, as for images."""
    try:
        config = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise OciboxError(f"cannot read {bundle / 'config.json'}: {exc}") from None
    cid = secrets.token_hex(32)
    folder = store.containers_dir / cid
    folder.mkdir(mode=0o700)
    try:
        root = config.get("root", {}).get("path", "rootfs")
        config.setdefault("root", {})["path"] = str((bundle / root).resolve())
        if req.command:
            config.setdefault("process", {})["args"] = req.command
        if req.tty:
            config.setdefault("process", {})["terminal"] = True
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return _start(folder, cid, upper=folder / "layer")
    finally:
        if req.rm:
            _remove(folder)


def _start(folder: Path, cid: str, upper: Path) -> int:
    """Run the runtime on the container folder; forward signals; return the container's status."""
    runtime = runtime_binary()
    argv = [runtime, "run", "--bundle", str(folder), "--upper", str(upper), cid]
    try:
        pid = os.fork()
    except OSError as exc:
        raise OciboxError(f"cannot start the runtime: {exc.strerror}") from None
    if pid == 0:
        try:
            os.execv(runtime, argv)
        except OSError as exc:
            os.write(2, f"ocibox: cannot execute the runtime {runtime}: {exc.strerror}\n".encode())
        os._exit(125)
    # SIGINT and SIGQUIT from the terminal reach the runtime too (same process group): ignore them here.
    previous = {sig: signal.signal(sig, lambda s, _f: _forward(pid, s)) for sig in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous[signal.SIGQUIT] = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
