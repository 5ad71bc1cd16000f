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
import signal
import sys
import time
from collections.abc import Callable, Mapping

from ocibox.errors import NotFound, OciboxError
from ocibox.locations import default_root

FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
_SIZE = r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$"
_ULIMITS = {
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
    "as",
}


class RunRequest:
    """What the user asked for, as `docker run` spells it. (A plain class: this module is on the
    path of every `ocibox run`, and importing dataclasses would cost more than the rest of it.)"""

    def __init__(
        self,
        image: str,
        command: list[str] | None = None,
        *,
        rm: bool = False,
        env: list[str] | None = None,
        env_files: list[str] | None = None,
        volumes: list[str] | None = None,
        tmpfs: list[str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        entrypoint: str | None = None,
        hostname: str | None = None,
        interactive: bool = False,
        tty: bool = False,
        network: str = "host",
        read_only: bool = False,
        memory: str | None = None,
        cpus: str | None = None,
        pids_limit: int | None = None,
        ulimits: list[str] | None = None,
        name: str | None = None,
        platform: str | None = None,
        pull: str = "missing",
        quiet: bool = False,
    ) -> None:
        self.image, self.command, self.rm = image, command or [], rm
        self.env, self.env_files = env or [], env_files or []
        self.volumes, self.tmpfs = volumes or [], tmpfs or []
        self.workdir, self.user, self.entrypoint, self.hostname = workdir, user, entrypoint, hostname
        self.interactive, self.tty, self.network, self.read_only = interactive, tty, network, read_only
        self.memory, self.cpus, self.pids_limit, self.ulimits = memory, cpus, pids_limit, ulimits or []
        self.name, self.platform, self.pull, self.quiet = name, platform, pull, quiet


class Volume:
    def __init__(self, source: str, destination: str, read_only: bool = False) -> None:
        self.source, self.destination, self.read_only = source, destination, read_only

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Volume) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Volume({self.source!r}, {self.destination!r}, read_only={self.read_only})"


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
        except UnicodeDecodeError:
            raise OciboxError(f"cannot read env file {path}: not UTF-8 text") from None
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
    if (
        len(parts) >= 2
        and parts[-1]
        and all(
            o
            in ("ro", "rw", "z", "Z", "rprivate", "private", "rslave", "slave", "rshared", "shared", "nocopy")
            for o in parts[-1].split(",")
        )
    ):
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
    if os.path.normpath(dest) in ("/", "//", "/dev"):
        # "/" is the image itself; /dev is filled by the runtime, which would make its device
        # nodes in the host folder
        raise OciboxError(f"invalid volume {text!r}: the container path can't be {os.path.normpath(dest)}")
    return Volume(source, os.path.normpath(dest), "ro" in options)


def parse_size(text: str, flag: str) -> int:
    """Docker's sizes: `32m`, `1g`, `512k`, `1073741824` (bytes)."""
    import re

    match = re.match(_SIZE, text)
    if not match:
        raise OciboxError(f"invalid {flag} {text!r}: use a size such as 512m or 2g")
    number, unit = float(match[1]), match[2].lower()
    return int(number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


MIN_MEMORY = 6 << 20  # docker's minimum: less can't even start a process reliably


def parse_memory(text: str) -> int:
    limit = parse_size(text, "--memory")
    if limit < MIN_MEMORY:
        raise OciboxError(f"invalid --memory {text!r}: the minimum memory limit is 6m, as with docker")
    return limit


def check_workdir(path: str | None) -> str | None:
    if path is not None and not path.startswith("/"):
        raise OciboxError(f"the working directory {path!r} is invalid: it must be an absolute path")
    return path


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
        raise OciboxError(
            f"invalid --ulimit {text!r}: expected NAME=SOFT[:HARD] with NAME one of "
            + ", ".join(sorted(_ULIMITS))
        )
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


# --- the image, fast -------------------------------------------------------------------------------


def _store_name(text: str) -> str | None:
    """The name a stored image has for `text` (docker.io/library/x:latest for `x`), for the fast
    look-up only: anything unusual returns None and takes the full path (ocibox.reference)."""
    if not text or "@" in text or text.strip() != text:
        return None
    slash, colon = text.rfind("/"), text.rfind(":")
    repo, tag = (text[:colon], text[colon + 1 :]) if colon > slash else (text, "latest")
    if repo.lower() != repo:
        return None
    first, sep, rest = repo.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", repo
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    return f"{domain}/{path}:{tag}" if tag and path else None


def _sha256_hex(data: bytes) -> str:
    try:
        from _sha256 import sha256  # the builtin module: no OpenSSL to load
    except ImportError:
        from hashlib import sha256
    return sha256(data).hexdigest()


class ReadyImage:
    """A stored image with its rootfs unpacked: all `ocibox run` needs of it."""

    def __init__(self, name: str, manifest_digest: str, config: dict, rootfs: str) -> None:
        self.name, self.manifest_digest, self.config, self.rootfs = name, manifest_digest, config, rootfs


def ready_image(root: str, text: str) -> ReadyImage | None:
    """A stored image whose rootfs is already unpacked, found with nothing but JSON reads; None
    when it isn't (then the full path pulls, unpacks and reports errors)."""
    name = _store_name(text)
    if name is None:
        return None
    blobs = os.path.join(root, "blobs", "sha256")
    try:
        with open(os.path.join(root, "index.json"), "rb") as f:
            entries = json.load(f)["manifests"]
        digest = next(
            e["digest"]
            for e in entries
            if (e.get("annotations") or {}).get("org.opencontainers.image.ref.name") == name
        )
        with open(os.path.join(blobs, digest.partition(":")[2]), "rb") as f:
            raw = f.read()
        manifest = json.loads(raw)
        config_digest = manifest["config"]["digest"]
        with open(os.path.join(blobs, config_digest.partition(":")[2]), "rb") as f:
            config_raw = f.read()
        if "sha256:" + _sha256_hex(raw) != digest or "sha256:" + _sha256_hex(config_raw) != config_digest:
            return None  # changed on disk: the full path says so
        config = json.loads(config_raw)
        if not _plain_config(config):
            return None  # the full path explains what is wrong with it
        chain = ""
        for diff_id in config["rootfs"]["diff_ids"]:
            chain = diff_id if not chain else "sha256:" + _sha256_hex(f"{chain} {diff_id}".encode())
    except (OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError):
        return None
    rootfs = os.path.join(root, "rootfs", chain.partition(":")[2] or _sha256_hex(b""))
    if not os.path.isdir(rootfs):
        return None
    used = os.path.join(root, "used", digest.partition(":")[2])
    try:
        os.utime(used)
    except OSError:
        pass
    return ReadyImage(name, digest, config, rootfs)


def _plain_config(config: dict) -> bool:
    """The config's run fields have the types ocibox.image checks, a lone Entrypoint or Cmd string
    made a list as Docker reads it."""
    cfg = config.get("config") or {}
    if not isinstance(cfg, dict):
        return False
    for key in ("Entrypoint", "Cmd"):
        if isinstance(cfg.get(key), str):
            cfg[key] = [cfg[key]]
    for key in ("Env", "Entrypoint", "Cmd"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return False
    return all(isinstance(cfg.get(key), str | None) for key in ("User", "WorkingDir"))


def _prepare_image(req: RunRequest) -> ReadyImage:
    """The slow path: find (or pull) the image through the store, and unpack it if needed."""
    from ocibox import reference
    from ocibox.store import Store
    from ocibox.unpack import ensure_rootfs

    store = Store.default().ensure()
    image = None
    if req.pull != "always":
        try:
            image = store.load_image(req.image)
        except NotFound:
            if req.pull == "never":
                raise
    if image is None:
        from ocibox.image import Platform
        from ocibox.progress import Progress
        from ocibox.transfer import pull

        ref = reference.parse(req.image)
        progress = Progress.auto(quiet=req.quiet, stream=sys.stderr)
        if req.pull != "always":
            progress.message(f"Unable to find image '{ref.familiar}' locally")
        platform = Platform.parse(req.platform) if req.platform else None
        result = pull(ref, store, platform=platform, progress=progress)
        image = store.load_image(result.name)
    rootfs = ensure_rootfs(store, image)
    store.mark_used(image.manifest_digest)
    return ReadyImage(image.name, image.manifest_digest, image.config.raw, str(rootfs))


# --- the container folder ------------------------------------------------------------------------


def _etc_files(folder: str, hostname: str, network: str) -> dict[str, str]:
    """hosts, hostname and resolv.conf for the container, bind-mounted read-write like docker's."""
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    resolv = ""
    if network == "host":
        hosts = _read_text("/etc/hosts", hosts)
        resolv = _read_text("/etc/resolv.conf", "")
    files = {
        "/etc/hostname": hostname + "\n",
        "/etc/hosts": hosts + f"127.0.1.1\t{hostname}\n",
        "/etc/resolv.conf": resolv,
    }
    out = {}
    for target, text in files.items():
        path = os.path.join(folder, os.path.basename(target))
        with open(path, "w") as f:
            f.write(text)
        out[target] = path
    return out


def _read_text(path: str, default: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def runtime_binary() -> str:
    """The runtime for this machine: $OCIBOX_RUNTIME, the one installed beside the package, the
    repository's build, or one on PATH (the quick form of ocibox.runtimes.runtime_for)."""
    if path := os.environ.get("OCIBOX_RUNTIME"):
        return path
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (
        os.path.join(here, "libexec", "ocibox-runtime"),
        os.path.join(os.path.dirname(os.path.dirname(here)), "runtime", "ocibox-runtime"),
    ):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(folder, "ocibox-runtime")
        if folder and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise OciboxError("the ocibox runtime is missing: build it with `make -C runtime` or set OCIBOX_RUNTIME")


def _remove(path: str) -> None:
    """Remove a container folder. Plain removal first (shutil would import bz2 and lzma at every
    start); unreadable folders (overlayfs's work dir) and files of the container's other users
    are left to store.remove_tree, through the user namespace where needed."""
    try:
        for top, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(top, name))
            for name in dirs:
                full = os.path.join(top, name)
                os.unlink(full) if os.path.islink(full) else os.rmdir(full)
        os.rmdir(path)
        return
    except OSError:
        pass
    from pathlib import Path

    from ocibox.store import remove_tree

    try:
        remove_tree(Path(path))
    except OSError:
        from ocibox import userns

        userns.run_as_root(remove_tree, Path(path))


def _name_taken(containers: str, name: str) -> bool:
    try:
        entries = list(os.scandir(containers))
    except OSError:
        return False
    for entry in entries:
        try:
            with open(os.path.join(entry.path, "state.json")) as f:
                if json.load(f).get("Name") == name:
                    return True
        except (OSError, ValueError):
            continue
    return False


def _new_container(root: str) -> tuple[str, str]:
    containers = os.path.join(root, "containers")
    os.makedirs(containers, mode=0o755, exist_ok=True)
    cid = os.urandom(32).hex()
    folder = os.path.join(containers, cid)
    os.mkdir(folder, 0o700)
    return cid, folder


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


# --- run -------------------------------------------------------------------------------------------


def run(req: RunRequest) -> int:
    """Run a container as `req` says; returns its exit status (docker run's codes)."""
    root = default_root()
    if os.path.isfile(os.path.join(req.image, "config.json")):
        return _run_bundle(root, os.path.abspath(req.image), req)
    image = (ready_image(root, req.image) if req.pull != "always" else None) or _prepare_image(req)
    if req.name and _name_taken(os.path.join(root, "containers"), req.name):
        raise OciboxError(f"the container name {req.name!r} is already in use")
    from ocibox import spec

    try:
        cid, folder = _new_container(root)
    except OSError as exc:
        raise OciboxError(f"cannot create the container folder in {root}: {exc.strerror}") from None
    started = False  # a container that never started (bad volume, env, user…) leaves no folder
    try:
        # Docker: the host's name on the host network, else the container ID's prefix.
        hostname = req.hostname or (os.uname().nodename if req.network == "host" else cid[:12])
        anonymous = iter(range(1 << 30))

        def anonymous_dir() -> str:
            path = os.path.join(folder, "volumes", str(next(anonymous)))
            os.makedirs(path)
            return path

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
            workdir=check_workdir(req.workdir),
            user=req.user,
            hostname=hostname,
            volumes=[(v.source, v.destination, v.read_only) for v in volumes],
            tmpfs=req.tmpfs,
            read_only=req.read_only,
            network=req.network,
            memory=parse_memory(req.memory) if req.memory else None,
            cpus=parse_cpus(req.cpus) if req.cpus else None,
            pids_limit=req.pids_limit,
            ulimits=[parse_ulimit(u) for u in req.ulimits],
            terminal=req.tty,
            rootless=rootless,
            uid_mappings=[m.to_json() for m in maps.uids] if maps else None,
            gid_mappings=[m.to_json() for m in maps.gids] if maps else None,
            files=_etc_files(folder, hostname, req.network),
        )
        config = spec.runtime_config(image.config, opts, rootfs=image.rootfs)
        config["root"] = {"path": image.rootfs, "readonly": req.read_only}
        _write_json(os.path.join(folder, "config.json"), config)
        state = {
            "Id": cid,
            "Name": req.name or "",
            "Image": image.name,
            "ImageId": image.manifest_digest,
            "Created": time.time(),
            "Status": "running",
            "Command": config["process"]["args"],
        }
        _write_json(os.path.join(folder, "state.json"), state)
        status = _start(folder, cid, upper=os.path.join(folder, "layer"))
        started = True
        state.update(Status="exited", ExitCode=status, Finished=time.time())
        _write_json(os.path.join(folder, "state.json"), state)
        return status
    finally:
        if req.rm or not started:
            _remove(folder)


def _run_bundle(root: str, bundle: str, req: RunRequest) -> int:
    """A bundle made by `ocibox unpack` (or by hand): run its config as it is; a COMMAND replaces
    its args. Writes go to a layer that `--rm` throws away, as for images."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise OciboxError(f"cannot read {os.path.join(bundle, 'config.json')}: {exc}") from None
    parts = [config.get(k, {}) for k in ("root", "process")] if isinstance(config, dict) else [None]
    if not all(isinstance(part, dict) for part in parts) or not isinstance(parts[0].get("path", ""), str):
        raise OciboxError(
            f"{os.path.join(bundle, 'config.json')} is not an OCI runtime config "
            "(an object whose root and process are objects)"
        )
    cid, folder = _new_container(root)
    try:
        rootfs = config.get("root", {}).get("path", "rootfs")
        config.setdefault("root", {})["path"] = os.path.realpath(os.path.join(bundle, rootfs))
        if req.command:
            config.setdefault("process", {})["args"] = req.command
        if req.tty:
            config.setdefault("process", {})["terminal"] = True
        _write_json(os.path.join(folder, "config.json"), config)
        return _start(folder, cid, upper=os.path.join(folder, "layer"))
    finally:
        if req.rm:
            _remove(folder)


def _start(folder: str, cid: str, upper: str) -> int:
    """Run the runtime on the container folder; forward signals; return the container's status."""
    runtime = runtime_binary()
    argv = [runtime, "run", "--bundle", folder, "--upper", upper, cid]
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
