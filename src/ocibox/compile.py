"""`ocibox compile`: an image into one self-contained executable.

    [ocibox-runtime ELF][squashfs payload][config.json][footer]

The payload is the image's layers merged top-down into a squashfs (zstd) written while the layers
stream (flatten.py, squashfs.py): nothing is unpacked to disk. The config is spec.py's, made for
any caller: no id mappings (the runtime maps whoever runs it), no hostname, rlimits or resources
of the compiling host, and annotations the runtime reads:

    org.ocibox.image        the image's name
    org.ocibox.entrypoint   JSON array: what arguments given to the executable are appended to
    org.ocibox.cmd          JSON array: the default arguments (the config's args = entrypoint + cmd)
    org.ocibox.bind-cwd     "true": the caller's working directory is mounted and used as workdir

The footer (little-endian, 80 bytes, the last of the file): magic "OCIBOX\\0\\1", u32 format
version 1, u32 footer size 80, u64 payload offset, payload size, config offset, config size,
then the payload's sha256 (runtime/payload.c reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ocibox.errors import NotFound, OciboxError

MAGIC = b"OCIBOX\x00\x01"
FORMAT_VERSION = 1
FOOTER = struct.Struct("<8sII4Q32s")  # 80 bytes
CAPTURED = ("etc/passwd", "etc/group")  # read while flattening, to resolve the image's User
# zstd 10 on 256 KiB blocks: about mksquashfs' default size (zstd 15, 128 KiB) in a third of the
# time; 1 MiB blocks compress better still, but every small file read then decompresses more
DEFAULT_LEVEL = 10
DEFAULT_BLOCK_SIZE = 256 << 10


@dataclass
class CompileOptions:
    image: str
    output: str
    env: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)  # HOST:CONTAINER[:ro]
    entrypoint: str | None = None  # JSON array or one program; "" clears
    cmd: str | None = None  # JSON array or a shell-quoted line
    bind_cwd: bool = False
    level: int = DEFAULT_LEVEL  # zstd level
    block_size: int = DEFAULT_BLOCK_SIZE
    quiet: bool = False
    arch: str | None = None  # amd64 or arm64; None: this machine's


@dataclass
class CompileResult:
    output: str
    size: int
    payload_size: int
    payload_sha256: str
    image: str


def _output_path(output: str) -> Path:
    """Where the executable goes: a new or existing regular file (written beside, then renamed
    over it), never a folder, a device or a pipe, which a rename would replace."""
    path = Path(output).absolute() if output else None
    if path is None or path.is_dir() or (path.exists() and not path.is_file()):
        raise OciboxError(f"cannot write the executable to {output!r}: give the path of a file")
    return path


def parse_words(text: str, flag: str) -> list[str]:
    """A JSON array of strings, or words split like a shell does: as `ocibox build` reads them."""
    from ocibox.build import words

    return words(text, flag)


def parse_volume(text: str) -> tuple[str, str, bool]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
        raise OciboxError(f"invalid --volume {text!r}: use HOST:CONTAINER[:ro] with an absolute CONTAINER")
    if len(parts) == 3 and parts[2] not in ("ro", "rw"):
        raise OciboxError(f"invalid --volume {text!r}: the mode must be ro or rw")
    return os.path.abspath(parts[0]), parts[1], len(parts) == 3 and parts[2] == "ro"


def runtime_config(image_config: dict, opts: CompileOptions, name: str, etc: dict[str, bytes]) -> dict:
    """The config baked into the executable (see the module's docstring)."""
    from ocibox import spec

    with tempfile.TemporaryDirectory(prefix="ocibox-compile-") as tmp:
        (Path(tmp) / "etc").mkdir()
        for path, data in etc.items():
            (Path(tmp) / path).write_bytes(data)
        entrypoint = None if opts.entrypoint is None else parse_words(opts.entrypoint, "--entrypoint")
        cmd = None if opts.cmd is None else parse_words(opts.cmd, "--cmd")
        run = spec.RunOptions(
            args=cmd,
            entrypoint=entrypoint,
            env=list(opts.env),
            volumes=[parse_volume(v) for v in opts.volumes],
        )
        config = spec.runtime_config(image_config, run, rootfs=Path(tmp))
    process = config["process"]
    process.pop("rlimits", None)  # the caller's limits, as for a native program
    process["env"] = [e for e in process["env"] if not e.startswith("HOSTNAME=")]
    config.pop("hostname", None)  # the host's name, copied into the uts namespace
    config["linux"].pop("resources", None)
    config["root"] = {"path": "rootfs", "readonly": False}
    image_cfg = image_config.get("config") or {}
    final_entry = entrypoint if entrypoint is not None else list(image_cfg.get("Entrypoint") or [])
    n = len(final_entry)
    config.setdefault("annotations", {}).update(
        {
            "org.ocibox.image": name,
            "org.ocibox.entrypoint": json.dumps(process["args"][:n]),
            "org.ocibox.cmd": json.dumps(process["args"][n:]),
            "org.ocibox.bind-cwd": "true" if opts.bind_cwd else "false",
        }
    )
    return config


def _image(store, text: str, arch: str):
    """A stored image, an oci-archive/docker-archive file (loaded into the store), or a reference
    (pulled when missing, or when the stored one is for another architecture)."""
    from ocibox import archive
    from ocibox.image import Platform

    wanted = Platform("linux", arch)
    if os.path.isfile(text):
        names = archive.load(store, text)
        if not names:
            raise OciboxError(f"{text}: the archive holds no image")
        return _checked_arch(store.load_image(names[0]), wanted)
    try:
        image = store.load_image(text)
        if wanted.matches(image.config.platform):
            return image
        message = f"the stored image is for {image.config.platform}: pulling it for {wanted}"
    except NotFound:
        message = None
    from ocibox import reference
    from ocibox.progress import Progress
    from ocibox.transfer import pull

    ref = reference.parse(text)
    progress = Progress.auto(quiet=False, stream=sys.stderr)
    progress.message(message or f"Unable to find image '{ref.familiar}' locally")
    result = pull(ref, store, platform=wanted, progress=progress)
    return _checked_arch(store.load_image(result.name), wanted)


def _checked_arch(image, wanted):
    if not wanted.matches(image.config.platform):
        raise OciboxError(f"{image.name} is an image for {image.config.platform}, not {wanted}")
    return image


def compile_image(opts: CompileOptions, runtime: str | None = None) -> CompileResult:
    from ocibox.flatten import flatten
    from ocibox.runtimes import host_arch, runtime_for
    from ocibox.squashfs import SquashfsWriter
    from ocibox.store import Store

    store = Store.default().ensure()
    arch = opts.arch or host_arch()
    runtime = runtime or str(runtime_for(arch))  # before any pull: a missing runtime says so first
    image = _image(store, opts.image, arch)
    with open(runtime, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF":
        raise OciboxError(f"{runtime}: not an ELF executable")
    out_path = _output_path(opts.output)
    layers = [
        (store.blob_path(d.digest), diff_id)
        for d, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=False)
    ]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    except OSError as exc:
        raise OciboxError(f"cannot write {opts.output}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w+b") as out:
            out.write(elf)
            payload_off = out.tell()
            # the image's creation time as the image's own: the same image gives the same payload
            with SquashfsWriter(
                out, compression="zstd", level=opts.level, block_size=opts.block_size, mtime=_created(image)
            ) as writer:
                etc: dict[str, bytes] = {}
                root = flatten(writer, layers, capture=CAPTURED, captured=etc)
                payload_size = writer.finish(root)
            config = runtime_config(image.config.raw, opts, image.name, etc)
            text = json.dumps(config, separators=(",", ":")).encode()
            out.seek(payload_off)
            digest = _sha256(out, payload_size)
            config_off = payload_off + payload_size
            out.seek(config_off)
            out.write(text)
            out.write(
                FOOTER.pack(
                    MAGIC,
                    FORMAT_VERSION,
                    FOOTER.size,
                    payload_off,
                    payload_size,
                    config_off,
                    len(text),
                    digest,
                )
            )
            size = out.tell()
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return CompileResult(str(out_path), size, payload_size, digest.hex(), image.name)


def _created(image) -> int:
    from datetime import datetime

    try:
        return max(0, int(datetime.fromisoformat(image.config.created.replace("Z", "+00:00")).timestamp()))
    except (ValueError, TypeError, AttributeError):
        return 0


def _sha256(f, size: int) -> bytes:
    h = hashlib.sha256()
    left = size
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise OciboxError("compile: the payload was cut short while writing")
        h.update(chunk)
        left -= len(chunk)
    return h.digest()
