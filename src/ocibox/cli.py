"""The command line: parses arguments and calls the stage that does the work. Nothing else.

Each command is a `cmd_<name>(args) -> int` handler registered in `build_parser`. Errors are
OciboxError subclasses; `main` prints them as one line and exits with their code (design.md).
Modules are imported inside handlers so that `ocibox run` starts fast.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from ocibox import __version__
from ocibox.errors import OciboxError

TYPE_CHECKING = False
if TYPE_CHECKING:  # argparse is imported only where a parser is built: `ocibox run` skips it
    import argparse

COMMANDS_HELP = "Docker images without Docker: pull, run, build and compile OCI images, rootless."


def _store():
    from ocibox.store import Store

    return Store.default()


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


# --- images ------------------------------------------------------------------------------------


def _human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}"


def _ago(created: str) -> str:
    from datetime import UTC, datetime

    if not created:
        return "N/A"
    import re

    text = re.sub(r"(\.\d{6})\d+", r"\1", created).replace("Z", "+00:00")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return created
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (datetime.now(UTC) - when).total_seconds()
    for size, unit in (
        (86400 * 365, "year"),
        (86400 * 30, "month"),
        (86400 * 7, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
    ):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "less than a minute ago"


def cmd_images(args: argparse.Namespace) -> int:
    from ocibox import reference
    from ocibox.image import digest_hex

    store = _store()
    rows = []
    for tagged in store.tagged():
        image = store.load_image(tagged.name)
        ref = reference.parse(tagged.name)
        rows.append(
            {
                "Repository": ref.familiar.rsplit(":", 1)[0] if ref.tag else ref.familiar.split("@")[0],
                "Tag": ref.tag or "<none>",
                "Reference": tagged.name,
                "ID": digest_hex(image.id)[:12],
                "Digest": image.manifest_digest,
                "Size": image.size,
                "Created": image.config.created,
                "Platform": str(image.config.platform),
            }
        )
    if args.format == "json":
        _out(json.dumps(rows, indent=2))
        return 0
    if args.quiet:
        for row in rows:
            _out(row["ID"])
        return 0
    table = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    table += [(r["Repository"], r["Tag"], r["ID"], _ago(r["Created"]), _human_size(r["Size"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        _out("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json as _json

    from ocibox import reference
    from ocibox.image import digest_hex

    store = _store()
    docs = []
    for ref in args.image:
        image = store.load_image(ref)
        docs.append(
            {
                "Id": image.id,
                "RepoTags": [image.name],
                "RepoDigests": [f"{reference.parse(image.name).name}@{image.manifest_digest}"],
                "Created": image.config.created,
                "Architecture": image.config.platform.architecture,
                "Os": image.config.platform.os,
                "Variant": image.config.platform.variant or "",
                "Size": image.size,
                "ChainId": image.chain_id,
                "ManifestDigest": image.manifest_digest,
                "Manifest": _json.loads(image.manifest.raw),
                "Config": image.config.raw,
                "RootFS": {"Type": "layers", "Layers": image.config.diff_ids},
                "Rootfs": str(store.rootfs_dir / digest_hex(image.chain_id)),
            }
        )
    if args.format:
        for doc in docs:
            _out(_format_template(args.format, doc))
    else:
        _out(json.dumps(docs, indent=4))
    return 0


def _format_template(template: str, doc: dict) -> str:
    """A small subset of Go templates: `{{.Key.Sub}}` and `{{json .Key}}`; a missing key prints
    `<no value>` as Go's does, anything else is refused."""
    import re

    def value(path: str):
        node = doc
        for key in path.strip(".").split("."):
            if key:
                node = node.get(key) if isinstance(node, dict) else None
        return node

    def repl(match: re.Match) -> str:
        expr = match.group(1).strip()
        as_json = expr.startswith("json ")
        path = expr[5:].strip() if as_json else expr
        if not re.fullmatch(r"\.|(\.[A-Za-z0-9_-]+)+", path):
            raise OciboxError(
                f"invalid --format {template!r}: ocibox knows {{{{.Field.Sub}}}} and {{{{json .Field}}}}"
            )
        v = value(path)
        if as_json or isinstance(v, dict | list):
            return json.dumps(v)
        return "<no value>" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    text = re.sub(r"\{\{(.*?)\}\}", repl, template)
    if "{{" in text:
        raise OciboxError(f"invalid --format {template!r}: unclosed {{{{")
    return text


def cmd_rmi(args: argparse.Namespace) -> int:
    store = _store()
    for ref in args.image:
        name, _ = store.find(ref)
        store.untag(name)
        _out(f"Untagged: {name}")
    removed, freed = store.gc()
    if removed:
        _out(f"Deleted: {removed} files, {_human_size(freed)}")
    return 0


def _parse_age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise OciboxError(f"invalid duration {text!r}: use e.g. 30d, 12h, 90m") from None


def cmd_prune(args: argparse.Namespace) -> int:
    import time

    store = _store()
    if args.older_than:
        limit = time.time() - _parse_age(args.older_than)
        for tagged in store.tagged():
            if store.last_used(tagged.descriptor.digest) < limit:
                store.untag(tagged.name)
                _out(f"Untagged: {tagged.name}")
    removed, freed = store.gc()
    _out(f"Total reclaimed space: {_human_size(freed)} ({removed} files)")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from ocibox import archive

    archive.save(_store(), args.image, args.output, args.format)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from ocibox import archive

    for name in archive.load(_store(), args.input):
        _out(f"Loaded image: {name}")
    return 0


# --- registry: pull, login, logout ------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    from ocibox import reference
    from ocibox.image import Platform
    from ocibox.progress import Progress
    from ocibox.transfer import pull

    ref = reference.parse(args.image)
    platform = Platform.parse(args.platform) if args.platform else None
    progress = Progress.auto(quiet=args.quiet)
    last = args.image.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        progress.message("Using default tag: latest")
    result = pull(ref, _store(), platform=platform, insecure=args.insecure, progress=progress)
    _out(result.name)
    return 0


def _size_arg(text: str) -> int:
    """A byte count: 8388608, 512K, 8M, 1G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(value[-1:], 1)
    digits = value[:-1] if value[-1:] in units else value
    if not digits.isdigit() or int(digits) * scale <= 0:
        import argparse

        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 8M, 512K or a byte count")
    return int(digits) * scale


def cmd_push(args: argparse.Namespace) -> int:
    from ocibox import reference
    from ocibox.progress import Progress
    from ocibox.transfer import push

    dest = reference.parse(args.destination) if args.destination else None
    progress = Progress.auto(quiet=args.quiet)
    result = push(
        args.image, _store(), dest, insecure=args.insecure, progress=progress, chunk_size=args.chunk_size
    )
    _out(f"{result.repository}@{result.digest}")
    return 0


def _registry_name(text: str | None) -> str:
    from ocibox.registry.credentials import normalise_key

    name = normalise_key(text or "docker.io")
    if not name or "/" in name:
        raise OciboxError(f"invalid registry {text!r}: expected a host name such as docker.io or host:5000")
    return name


def cmd_unpack(args: argparse.Namespace) -> int:
    """`ocibox unpack REF DIR`: an OCI runtime bundle (DIR/rootfs + DIR/config.json)."""
    from ocibox.errors import NotFound
    from ocibox.unpack import make_bundle

    store = _store()
    try:
        image = store.load_image(args.image)
    except NotFound:
        from ocibox import reference
        from ocibox.progress import Progress
        from ocibox.transfer import pull

        result = pull(reference.parse(args.image), store, progress=Progress.auto(quiet=True))
        image = store.load_image(result.name)
    from pathlib import Path

    make_bundle(store, image, Path(args.dir))
    _out(args.dir)
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    import getpass

    from ocibox.reference import DEFAULT_REGISTRY, DOCKER_HUB_API
    from ocibox.registry import credentials
    from ocibox.registry.client import RegistryClient, Transport, insecure_hosts_from_env

    registry = _registry_name(args.registry)
    username = args.username
    password = args.password
    if password is not None:
        sys.stderr.write("WARNING! Using --password via the CLI is insecure. Use --password-stdin.\n")
    if args.password_stdin:
        if password is not None:
            raise OciboxError("--password and --password-stdin are mutually exclusive")
        if not username:
            raise OciboxError("--password-stdin needs a username (-u)")
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    interactive = sys.stdin.isatty()
    if not username:
        if not interactive:
            raise OciboxError("username required: use -u USER (no terminal to ask on)")
        username = input("Username: ").strip()
    if password is None:
        if not interactive:
            raise OciboxError("password required: use --password-stdin (no terminal to ask on)")
        password = getpass.getpass("Password: ")
    if not username or not password:
        raise OciboxError("login needs a username and a password")
    hosts = set(insecure_hosts_from_env()) | ({registry} if args.insecure else set())
    api_host = DOCKER_HUB_API if registry == DEFAULT_REGISTRY else registry
    client = RegistryClient(registry, api_host, transport=Transport(hosts))
    credential = credentials.Credential(username, password)
    client.auth.use_credential(credential)
    try:
        client.check_login()
    finally:
        client.close()
    path = credentials.save(registry, credential)
    _out(f"Login Succeeded (credentials in {path})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from ocibox.registry import credentials

    registry = _registry_name(args.registry)
    if credentials.erase(registry):
        _out(f"Removing login credentials for {registry}")
    else:
        _out(f"Not logged in to {registry}")
    return 0


# --- build, tag ----------------------------------------------------------------------------------


def _warn(message: str) -> None:
    sys.stderr.write(f"ocibox: warning: {message}\n")


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")


def cmd_build(args: argparse.Namespace) -> int:
    from ocibox.build import BuildOptions, build

    options = BuildOptions(
        program=args.from_binary,
        tag=args.tag,
        output=args.output,
        format=args.format,
        base=args.base,
        os=args.os,
        arch=args.arch,
        entrypoint=args.entrypoint,
        cmd=args.cmd,
        env=args.env,
        workdir=args.workdir,
        user=args.user,
        labels=args.label,
        expose=args.expose,
        add=args.add,
        add_certs=args.add_certs,
        add_passwd=args.add_passwd,
        source_date_epoch=os.environ.get("SOURCE_DATE_EPOCH"),
    )
    if args.push and not args.tag:
        raise OciboxError("--push needs --tag: the image is pushed to the name it is tagged with")
    store = _store()
    result = build(options, store, warn=_warn, say=_say)
    _out(result.image.manifest_digest)
    if args.push:
        from ocibox.progress import Progress
        from ocibox.transfer import push

        push(args.tag, store, insecure=args.insecure, progress=Progress.auto(quiet=args.quiet))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from ocibox import reference
    from ocibox.image import Descriptor

    store = _store()
    name, digest = store.find(args.source)
    target = reference.parse(args.target)
    if target.digest:
        raise OciboxError(f"invalid tag {args.target!r}: a tag can't contain a digest")
    manifest = store.manifest(digest)
    descriptor = store.lookup(name) or Descriptor(manifest.media_type, digest, len(manifest.raw))
    if descriptor.digest != digest:
        descriptor = Descriptor(manifest.media_type, digest, len(manifest.raw))
    store.tag(str(target), descriptor)
    return 0


# --- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from ocibox.run import RunRequest, run

    return run(
        RunRequest(
            image=args.image,
            command=list(args.command_args or []),
            rm=args.rm,
            env=args.env or [],
            env_files=args.env_file or [],
            volumes=args.volume or [],
            tmpfs=args.tmpfs or [],
            workdir=args.workdir,
            user=args.user,
            entrypoint=args.entrypoint,
            hostname=args.hostname,
            interactive=args.interactive,
            tty=args.tty,
            network=args.network,
            read_only=args.read_only,
            memory=args.memory,
            cpus=args.cpus,
            pids_limit=args.pids_limit,
            ulimits=args.ulimit or [],
            name=args.name,
            platform=args.platform,
            pull=args.pull,
            quiet=args.quiet,
        )
    )


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog="ocibox", description=COMMANDS_HELP)
    parser.add_argument("--version", action="version", version=f"ocibox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("images", help="list images in the store")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("inspect", help="show an image's manifest and config as JSON")
    p.add_argument("image", nargs="+")
    p.add_argument("-f", "--format", help="Go-template-like format, e.g. '{{.Config.config.Cmd}}'")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("rmi", help="remove images from the store")
    p.add_argument("image", nargs="+")
    p.set_defaults(func=cmd_rmi)

    p = sub.add_parser("prune", help="delete blobs and root filesystems no image needs")
    p.add_argument("--older-than", metavar="AGE", help="also drop images unused for AGE (e.g. 30d)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("save", help="write an image to an oci-archive or docker-archive file")
    p.add_argument("image", nargs="+")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--format", choices=["oci-archive", "docker-archive"], default="oci-archive")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("load", help="load images from an oci-archive or docker-archive file")
    p.add_argument("-i", "--input", required=True, metavar="FILE")
    p.set_defaults(func=cmd_load)

    # Commands of other stages register below this line.
    p = sub.add_parser(
        "run",
        help="run a command in a new container",
        add_help=False,
        usage="ocibox run [OPTIONS] IMAGE|BUNDLE-DIR [COMMAND [ARG...]]",
    )
    p.add_argument("--help", action="help", help="show this help message and exit")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-e", "--env", action="append", metavar="K[=V]", help="set an environment variable")
    p.add_argument("--env-file", action="append", metavar="FILE", help="read environment variables from FILE")
    p.add_argument("-v", "--volume", action="append", metavar="HOST:CTR[:ro]", help="bind mount a path")
    p.add_argument("--tmpfs", action="append", metavar="CTR[:OPTS]", help="mount a tmpfs")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="name or uid, optionally with a group")
    p.add_argument("--entrypoint", metavar="CMD", help="replace the image's entrypoint (clears its Cmd)")
    p.add_argument("-h", "--hostname", metavar="NAME", help="container host name")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument(
        "--network",
        "--net",
        choices=["host", "none"],
        default="host",
        help="host (default: like a native program) or none (loopback only)",
    )
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("-m", "--memory", metavar="SIZE", help="memory limit, e.g. 512m")
    p.add_argument("--cpus", metavar="N", help="number of CPUs, e.g. 1.5")
    p.add_argument("--pids-limit", type=int, metavar="N", help="maximum number of processes")
    p.add_argument("--ulimit", action="append", metavar="NAME=SOFT[:HARD]", help="resource limit")
    p.add_argument("--name", help="a name for the container")
    p.add_argument("--platform", metavar="OS/ARCH", help="platform to pull if the image is missing")
    p.add_argument("--pull", choices=["missing", "always", "never"], default="missing")
    p.add_argument("-q", "--quiet", action="store_true", help="no pull progress")
    p.add_argument("image", metavar="IMAGE|BUNDLE-DIR")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("build", help="build an image from a binary, FROM scratch or onto a base image")
    p.add_argument("--from-binary", required=True, metavar="PROG", help="the program: it becomes /PROG")
    p.add_argument("-t", "--tag", metavar="REF", help="put the image in the store under this name")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write an archive (default without --tag: PROG.tar, as zeroimage)",
    )
    p.add_argument("--format", choices=["oci-archive", "docker-archive"], default="oci-archive")
    p.add_argument("--base", metavar="IMAGE", help="append one layer to this image (default: scratch)")
    p.add_argument("--os", default="linux")
    p.add_argument("--arch", help="amd64, arm64, arm/v7, … (default: from PROG's ELF header)")
    p.add_argument("--entrypoint", metavar="CMD", help='JSON array or words (default: ["/PROG"])')
    p.add_argument("--cmd", metavar="CMD", help="JSON array or words")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]")
    p.add_argument("-l", "--label", action="append", default=[], metavar="K=V")
    p.add_argument("--expose", action="append", default=[], metavar="PORT[/PROTO]")
    p.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="SRC:DEST",
        help="copy a file or folder into the layer (repeatable)",
    )
    p.add_argument("--add-certs", action="store_true", help="add the host's CA bundle")
    p.add_argument("--add-passwd", action="store_true", help="add /etc/passwd and /etc/group (root, nobody)")
    p.add_argument("--push", action="store_true", help="then push the image to its --tag")
    p.add_argument("--insecure", action="store_true", help="with --push: allow plain HTTP and unverified TLS")
    p.add_argument("-q", "--quiet", action="store_true", help="with --push: no push progress")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("tag", help="give a stored image another name")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("pull", help="fetch an image from a registry into the store")
    p.add_argument("image", metavar="REF")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this host's")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the image name")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP and unverified TLS")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("push", help="upload a stored image to a registry")
    p.add_argument("image", metavar="REF", help="the image in the store")
    p.add_argument("destination", nargs="?", metavar="DEST", help="where it goes (default: REF itself)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the pushed reference")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP and unverified TLS")
    p.add_argument(
        "--chunk-size",
        type=_size_arg,
        metavar="SIZE",
        help="upload blobs bigger than this in chunks of this size (default: 8M)",
    )
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("unpack", help="write an OCI runtime bundle (DIR/rootfs, DIR/config.json) of an image")
    p.add_argument("image", metavar="REF")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("login", help="store credentials for a registry (Docker's config.json)")
    p.add_argument("registry", nargs="?", metavar="REGISTRY", help="default: docker.io")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP and unverified TLS")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="forget the credentials for a registry")
    p.add_argument("registry", nargs="?", metavar="REGISTRY", help="default: docker.io")
    p.set_defaults(func=cmd_logout)

    p = sub.add_parser("compile", help="compile an image into one self-contained executable")
    p.add_argument("image", metavar="IMAGE", help="a stored image, a reference to pull, or an archive file")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the executable to write")
    p.add_argument("--env", action="append", metavar="K=V", help="bake in an environment variable")
    p.add_argument("--volume", action="append", metavar="HOST:CTR[:ro]", help="bake in a bind mount")
    p.add_argument("--entrypoint", metavar="CMD", help="replace the entrypoint (JSON array or words)")
    p.add_argument("--cmd", metavar="ARGS", help="replace the default arguments (JSON array or words)")
    p.add_argument(
        "--bind-cwd",
        action="store_true",
        help="mount the caller's working directory at the same path and start there",
    )
    p.add_argument("--level", type=int, metavar="N", help="zstd level of the payload (default 10)")
    p.add_argument(
        "--block-size",
        type=_size_arg,
        metavar="SIZE",
        help="squashfs block size, a power of two from 4k to 1m (default 256k)",
    )
    p.add_argument(
        "--arch", choices=["amd64", "arm64"], help="the architecture to compile for (default: this machine's)"
    )
    p.set_defaults(func=cmd_compile)
    return parser


def cmd_compile(args: argparse.Namespace) -> int:
    from ocibox.compile import DEFAULT_BLOCK_SIZE, DEFAULT_LEVEL, CompileOptions, compile_image

    result = compile_image(
        CompileOptions(
            image=args.image,
            output=args.output,
            env=args.env or [],
            volumes=args.volume or [],
            entrypoint=args.entrypoint,
            cmd=args.cmd,
            bind_cwd=args.bind_cwd,
            level=args.level or DEFAULT_LEVEL,
            block_size=args.block_size or DEFAULT_BLOCK_SIZE,
            arch=args.arch,
        )
    )
    _out(
        f"{result.output}: {result.image}, {_human_size(result.size)} "
        f"(payload sha256:{result.payload_sha256})"
    )
    return 0


# `ocibox run` starts a process: its flags are read here without argparse, which alone would
# cost more than the rest of the start. Anything this doesn't know (--help, an unknown or
# malformed flag) goes to the argparse parser, which reports it as for every command.
_RUN_FLAGS = {
    "--rm": "rm",
    "-i": "interactive",
    "--interactive": "interactive",
    "-t": "tty",
    "--tty": "tty",
    "--read-only": "read_only",
    "-q": "quiet",
    "--quiet": "quiet",
}
_RUN_OPTIONS = {
    "-e": "env",
    "--env": "env",
    "--env-file": "env_file",
    "-v": "volume",
    "--volume": "volume",
    "--tmpfs": "tmpfs",
    "-w": "workdir",
    "--workdir": "workdir",
    "-u": "user",
    "--user": "user",
    "--entrypoint": "entrypoint",
    "-h": "hostname",
    "--hostname": "hostname",
    "--network": "network",
    "--net": "network",
    "-m": "memory",
    "--memory": "memory",
    "--cpus": "cpus",
    "--pids-limit": "pids_limit",
    "--ulimit": "ulimit",
    "--name": "name",
    "--platform": "platform",
    "--pull": "pull",
}
_RUN_LISTS = {"env", "env_file", "volume", "tmpfs", "ulimit"}
_RUN_CHOICES = {"network": ("host", "none"), "pull": ("missing", "always", "never")}


def _quick_run_args(argv: Sequence[str]):
    """The run command's arguments as argparse would give them, or None to let argparse decide."""
    from types import SimpleNamespace

    values: dict = {name: [] for name in _RUN_LISTS}
    values.update(dict.fromkeys(_RUN_FLAGS.values(), False))
    values.update(
        workdir=None,
        user=None,
        entrypoint=None,
        hostname=None,
        network="host",
        memory=None,
        cpus=None,
        pids_limit=None,
        name=None,
        platform=None,
        pull="missing",
    )
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            break
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            letters = [f"-{c}" for c in arg[1:]]
            if not all(letter in _RUN_FLAGS for letter in letters):
                return None
            for letter in letters:
                values[_RUN_FLAGS[letter]] = True
        elif flag in _RUN_FLAGS and not eq:
            values[_RUN_FLAGS[flag]] = True
        elif flag in _RUN_OPTIONS:
            if not eq:
                i += 1
                if i >= len(argv):
                    return None
                inline = argv[i]
            name = _RUN_OPTIONS[flag]
            if name in _RUN_CHOICES and inline not in _RUN_CHOICES[name]:
                return None
            if name == "pids_limit":
                if not inline.lstrip("-").isdigit():
                    return None
                values[name] = int(inline)
            elif name in _RUN_LISTS:
                values[name].append(inline)
            else:
                values[name] = inline
        else:
            return None
        i += 1
    if i >= len(argv):
        return None
    return SimpleNamespace(func=cmd_run, image=argv[i], command_args=list(argv[i + 1 :]), **values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _quick_run_args(argv[1:]) if argv[:1] == ["run"] else None
    if args is None:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
    try:
        return int(args.func(args) or 0)
    except OciboxError as exc:
        sys.stderr.write(f"ocibox: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("ocibox: interrupted\n")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(f"ocibox: {exc.strerror or exc}{where}\n")
        return 125
    except Exception as exc:  # a bug of ours: still one line, unless asked for the traceback
        if os.environ.get("OCIBOX_DEBUG"):
            raise
        sys.stderr.write(
            f"ocibox: internal error: {type(exc).__name__}: {exc} "
            "(OCIBOX_DEBUG=1 shows the traceback; please report it)\n"
        )
        return 125
