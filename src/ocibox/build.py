"""Images from a binary, with no Docker: `ocibox build --from-binary PROG [--base IMAGE]`.

Without a base it makes what zeroimage makes, as if from this Dockerfile:

    FROM scratch
    COPY PROG /PROG          (mode 0755, owner 0:0)
    ENTRYPOINT ["/PROG"]

With a base it appends one layer to the base image and keeps the base's config (its Env,
WorkingDir, User, Labels…), extending `rootfs.diff_ids` and `history`, like `crane append`; the
entrypoint becomes /PROG and the base's Cmd is dropped, as a Dockerfile ENTRYPOINT does.
`--add SRC:DEST` puts more files or folders in the same layer.

Reproducible: the same inputs give byte-identical blobs and archives. Every entry's mtime and
the config's `created` are SOURCE_DATE_EPOCH when set, else 0 (1970-01-01T00:00:00Z, as ko does);
entries are sorted, owned by 0:0 with no user or group names, written as PAX tar; gzip carries
no file name and mtime 0; JSON is compact with a fixed key order.

Outputs: an OCI archive (default file `PROG.tar` beside PROG, as zeroimage names it), a
docker-archive, and/or the store under `--tag`. Files are written to a temp name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ocibox import elf, reference
from ocibox.build_layer import Entry, LayerBlob, LayerPlan, image_path, parse_add, plan_add, write_layer
from ocibox.errors import NotFound, OciboxError
from ocibox.image import (
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Image,
    ImageConfig,
    Manifest,
    Platform,
    digest_hex,
    parse_manifest,
    sha256_digest,
)
from ocibox.store import Store

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_DEST = "etc/ssl/certs/ca-certificates.crt"
PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
GROUP = "root:x:0:\nnobody:x:65534:\n"
BASE_NAME = "org.opencontainers.image.base.name"
BASE_DIGEST = "org.opencontainers.image.base.digest"
FORMATS = ("oci-archive", "docker-archive")
_CHUNK = 1 << 20


@dataclass
class BuildOptions:
    program: str
    tag: str | None = None
    output: str | None = None
    format: str = "oci-archive"
    base: str | None = None
    os: str = "linux"
    arch: str | None = None
    entrypoint: str | None = None  # JSON array or shell-like words; "" clears it
    cmd: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    labels: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    add: list[str] = field(default_factory=list)
    add_certs: bool = False
    add_passwd: bool = False
    source_date_epoch: str | None = None  # the environment's SOURCE_DATE_EPOCH, as text


@dataclass
class BuildResult:
    image: Image  # name "" when the image was only written to a file
    output: Path | None


# --- config ------------------------------------------------------------------------------------


def words(text: str, flag: str) -> list[str]:
    """`["a","b c"]` (JSON, as in a Dockerfile) or `a 'b c'` (shell words) → ["a", "b c"]."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OciboxError(f"invalid {flag} {text!r}: not a JSON array ({exc.msg})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise OciboxError(f"invalid {flag} {text!r}: expected a JSON array of strings")
        return value
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise OciboxError(f"invalid {flag} {text!r}: {exc}") from None


def key_values(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OciboxError(f"invalid {flag} {item!r}: expected KEY=VALUE")
        out.append((key, value))
    return out


def exposed_ports(items: list[str]) -> list[str]:
    """`80`, `53/udp`, `8000-8002/tcp` → ["80/tcp", "53/udp", "8000/tcp", …] as EXPOSE does."""
    out = []
    for item in items:
        ports, _, proto = item.partition("/")
        proto = (proto or "tcp").lower()
        low, _, high = ports.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            first = last = -1
        if proto not in ("tcp", "udp", "sctp") or not 0 < first <= last <= 65535:
            raise OciboxError(f"invalid --expose {item!r}: expected PORT[-PORT][/tcp|udp|sctp]")
        out += [f"{port}/{proto}" for port in range(first, last + 1)]
    return out


def epoch_from(text: str | None) -> int:
    if text is None or text == "":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise OciboxError(f"invalid SOURCE_DATE_EPOCH {text!r}: expected seconds since 1970 (an integer)")
    return value


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_json(doc: dict[str, Any]) -> bytes:
    """Compact JSON in the document's own key order: the same document, the same bytes."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def apply_options(config: dict[str, Any], opts: BuildOptions, entrypoint: list[str]) -> None:
    """Set the container config (`config.config`) from the options, keeping what they don't touch."""
    run = dict(config.get("config") or {})
    run["Entrypoint"] = entrypoint
    run.pop("Cmd", None)
    if opts.cmd is not None:
        run["Cmd"] = words(opts.cmd, "--cmd")
    env = list(run.get("Env") or [])
    for key, value in key_values(opts.env, "--env"):
        env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={value}"]
    run["Env"] = env
    if opts.workdir is not None:
        run["WorkingDir"] = "/" + image_path(opts.workdir) if opts.workdir.strip("/") else "/"
    if opts.user is not None:
        run["User"] = opts.user
    labels = dict(run.get("Labels") or {})
    labels.update(key_values(opts.labels, "--label"))
    run["Labels"] = labels
    ports = dict(run.get("ExposedPorts") or {})
    ports.update({p: {} for p in exposed_ports(opts.expose)})
    run["ExposedPorts"] = ports
    config["config"] = {k: v for k, v in run.items() if v not in (None, [], {}, "")}


# --- the build ---------------------------------------------------------------------------------


@dataclass
class _Program:
    path: Path
    name: str  # its name in the image: /<name>
    info: elf.ElfInfo | None


def check_program(text: str) -> _Program:
    path = Path(text)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound(f"--from-binary: no such file: {text}") from None
    except OSError as exc:
        raise OciboxError(f"--from-binary: cannot read {text}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OciboxError(f"--from-binary: {text} is a folder, not a program")
    if not stat.S_ISREG(st.st_mode):
        raise OciboxError(f"--from-binary: {text} is not a regular file")
    try:
        info = elf.read_elf(path)
    except OSError as exc:
        raise OciboxError(f"--from-binary: cannot read {text}: {exc.strerror}") from None
    return _Program(path, path.name, info)


def choose_platform(
    opts: BuildOptions, program: _Program, base: Image | None, warn: Callable[[str], None]
) -> Platform:
    found = program.info.architecture if program.info else None
    if opts.arch:
        wanted = Platform.parse(f"{opts.os}/{opts.arch}")
        if found and found != wanted.architecture:
            warn(f"{program.path} is an {found} program, but the image says {wanted.architecture} (--arch)")
    elif found:
        wanted = Platform.parse(f"{opts.os}/{found}")
    elif base is not None:
        wanted = base.config.platform
    elif program.info:
        raise OciboxError(
            f"{program.path} is an ELF program for machine {program.info.machine}, which ocibox has no "
            "name for: give --arch"
        )
    else:
        raise OciboxError(f"{program.path} is not an ELF executable: give --arch for its platform")
    if base is not None:
        have = base.config.platform
        if (have.os, have.architecture) != (wanted.os, wanted.architecture):
            raise OciboxError(f"the base image {base.name} is {have}, but the program is for {wanted}")
    return wanted


def dynamic_warning(program: _Program) -> str:
    return (
        f"{program.path} is dynamically linked (it needs {program.info.interpreter if program.info else '?'} "
        "and its shared libraries), but an image without --base has only this program: it will not start. "
        "Link it statically or build onto a base image with --base. A FROM-scratch image also has no "
        "/etc/passwd (--add-passwd), no time-zone data and no CA certificates (--add-certs)."
    )


def _load_base(store: Store, text: str, platform: Platform | None, say: Callable[[str], None]) -> Image:
    try:
        return store.load_image(text)
    except NotFound:
        pass
    try:
        from ocibox import transfer
    except ImportError:
        transfer = None  # type: ignore[assignment]
    pull = getattr(transfer, "pull", None)
    if pull is None:
        raise NotFound(f"base image {text} is not in the store: load or pull it first")
    ref = reference.parse(text)
    say(f"Pulling base image {ref.familiar}")
    try:
        result = pull(ref, store, platform=platform)
    except OciboxError as exc:
        error = OciboxError(f"base image {text} is not in the store and pulling it failed: {exc}")
        error.exit_code = exc.exit_code
        raise error from None
    return store.load_image(getattr(result, "name", str(ref)))


class _NewBlobs:
    """The build's new blobs (in a temp folder), over the store's: what write_archive reads."""

    def __init__(self, folder: Path, store: Store | None) -> None:
        self.tmp_dir = folder
        self.store = store
        self.paths: dict[str, Path] = {}

    def put(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        path = self.tmp_dir / digest_hex(digest)
        path.write_bytes(data)
        self.paths[digest] = path
        return Descriptor(media_type, digest, len(data))

    def blob_path(self, digest: str) -> Path:
        if digest in self.paths:
            return self.paths[digest]
        if self.store is None:
            raise NotFound(f"blob {digest} is not part of this build")
        return self.store.blob_path(digest)

    def open_blob(self, digest: str) -> BinaryIO:
        if digest in self.paths:
            return open(self.paths[digest], "rb")
        if self.store is None:
            raise NotFound(f"blob {digest} is not part of this build")
        return self.store.open_blob(digest)

    def copy_into(self, store: Store) -> None:
        for digest, path in self.paths.items():
            if store.has_blob(digest):
                continue
            with open(path, "rb") as src, store.blob_writer(digest, path.stat().st_size) as w:
                while chunk := src.read(_CHUNK):
                    w.write(chunk)


def default_output(opts: BuildOptions) -> str | None:
    """zeroimage's rule: `PROG.tar` beside PROG, unless the image only goes into the store."""
    if opts.output:
        return opts.output
    return None if opts.tag else opts.program + ".tar"


def build(
    opts: BuildOptions, store: Store, warn: Callable[[str], None], say: Callable[[str], None]
) -> BuildResult:
    """Check everything, write the layer and JSON to a temp folder, then publish: file, store tag."""
    if opts.format not in FORMATS:
        raise OciboxError(f"invalid --format {opts.format!r}: use oci-archive or docker-archive")
    epoch = epoch_from(opts.source_date_epoch)
    name = str(reference.parse(opts.tag)) if opts.tag else ""
    if opts.tag and reference.parse(opts.tag).digest:
        raise OciboxError(f"--tag {opts.tag}: a tag can't contain a digest")
    output = default_output(opts)
    out_path = Path(output) if output else None
    if out_path is not None:
        if not out_path.parent.is_dir():
            raise OciboxError(f"-o {output}: no such folder: {out_path.parent}")
        if out_path.is_dir():
            raise OciboxError(f"-o {output} is a folder: give a file name")
    program = check_program(opts.program)
    adds = [parse_add(spec) for spec in opts.add]
    if opts.add_certs and not CA_BUNDLE.is_file():
        raise OciboxError(f"--add-certs: this host has no CA bundle at {CA_BUNDLE} (install ca-certificates)")
    for key in ("entrypoint", "cmd"):
        if getattr(opts, key) is not None:
            words(getattr(opts, key), "--" + key)
    key_values(opts.env, "--env")
    key_values(opts.labels, "--label")
    exposed_ports(opts.expose)

    with contextlib.ExitStack() as stack:
        base: Image | None = None
        uses_store = bool(opts.base or opts.tag)
        if uses_store:
            stack.enter_context(store.using())
        if opts.base:
            hint = Platform.parse(f"{opts.os}/{opts.arch}") if opts.arch else None
            if hint is None and program.info and program.info.architecture:
                hint = Platform.parse(f"{opts.os}/{program.info.architecture}")
            base = _load_base(store, opts.base, hint, say)
        platform = choose_platform(opts, program, base, warn)
        if base is None and program.info and program.info.dynamic:
            warn(dynamic_warning(program))

        plan = LayerPlan()
        plan.add(
            Entry(
                image_path(program.name), "file", 0o755, f"--from-binary {program.path}", source=program.path
            )
        )
        for src, dest in adds:
            plan_add(plan, src, dest)
        if opts.add_certs:
            plan.add(Entry(CA_DEST, "file", 0o644, "--add-certs", source=CA_BUNDLE))
        if opts.add_passwd:
            plan.add(Entry("etc/passwd", "file", 0o644, "--add-passwd", data=PASSWD.encode()))
            plan.add(Entry("etc/group", "file", 0o644, "--add-passwd", data=GROUP.encode()))

        folder = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(dir=store.tmp_dir if uses_store else None, prefix="build-")
            )
        )
        blobs = _NewBlobs(folder, store if base else None)
        # Over a base, folders we only create as parents are left out: the base's stay as they are.
        layer = write_layer(plan.sorted(with_implicit=base is None), epoch, folder)
        blobs.paths[layer.digest] = layer.path

        added = ["/" + program.name, *("/" + image_path(dest) for _, dest in adds)]
        added += ["/" + CA_DEST] * opts.add_certs + ["/etc/passwd", "/etc/group"] * opts.add_passwd
        image = _assemble(opts, program, platform, base, layer, epoch, name, blobs, added)
        if out_path is not None:
            from ocibox import archive

            archive.write_archive(blobs, [image], str(out_path), opts.format)
            say(f"Wrote {out_path} ({opts.format})")
        if opts.tag:
            blobs.copy_into(store)
            store.tag(
                name,
                Descriptor(
                    image.manifest.media_type, image.manifest_digest, len(image.manifest.raw), None, platform
                ),
            )
            say(f"Tagged {name}")
    return BuildResult(image, out_path)


def _assemble(
    opts: BuildOptions,
    program: _Program,
    platform: Platform,
    base: Image | None,
    layer: LayerBlob,
    epoch: int,
    name: str,
    blobs: _NewBlobs,
    added: list[str],
) -> Image:
    """The config and manifest for the new layer, on `base` or on nothing."""
    created = rfc3339(epoch)
    if base is None:
        config: dict[str, Any] = {"created": created, **platform.to_json(), "config": {}}
        config["rootfs"] = {"type": "layers", "diff_ids": []}
        config["history"] = []
        manifest_type, config_type, layer_type = OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP
        base_layers: list[Descriptor] = []
    else:
        config = json.loads(json.dumps(base.config.raw))
        config["created"] = created
        config.setdefault("rootfs", {"type": "layers"})
        config["rootfs"]["diff_ids"] = base.config.diff_ids
        config["history"] = list(config.get("history") or [])
        manifest_type = base.manifest.media_type
        config_type = base.manifest.config.media_type
        layer_type = DOCKER_LAYER if manifest_type == DOCKER_MANIFEST else OCI_LAYER_GZIP
        base_layers = base.manifest.layers
    default = ["/" + program.name]
    entrypoint = words(opts.entrypoint, "--entrypoint") if opts.entrypoint is not None else default
    apply_options(config, opts, entrypoint)
    config["rootfs"]["diff_ids"].append(layer.diff_id)
    config["history"].append(
        {
            "created": created,
            "created_by": "ocibox build --from-binary " + program.name,
            "comment": "added " + " ".join(added),
        }
    )
    config_raw = canonical_json(config)
    config_desc = blobs.put(config_raw, config_type)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in base_layers],
    }
    manifest["layers"].append(Descriptor(layer_type, layer.digest, layer.size).to_json())
    if base is not None and manifest_type == OCI_MANIFEST:
        manifest["annotations"] = {BASE_DIGEST: base.manifest_digest, BASE_NAME: base.name}
    manifest_raw = canonical_json(manifest)
    blobs.put(manifest_raw, manifest_type)
    parsed = parse_manifest(manifest_raw)
    assert isinstance(parsed, Manifest)
    return Image(name, sha256_digest(manifest_raw), parsed, ImageConfig.parse(config_raw))
