"""Image archives in and out of the store: `ocibox save` and `ocibox load`.

Two formats, both what docker and podman read and write:
- oci-archive: a tar of an OCI image layout (oci-layout, index.json, blobs/sha256/…), as
  `skopeo copy … oci-archive:` and `docker save` (25+) write it. The image's full name goes in
  the `io.containerd.image.name` annotation, its tag in `org.opencontainers.image.ref.name`.
- docker-archive: `manifest.json` + config + uncompressed layer tars, as classic `docker save`.
`load` detects the format from the archive's contents, checks every digest, and imports
atomically (each blob verified before it becomes visible, the tag written last).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ocibox import reference
from ocibox.errors import IntegrityError, NotFound, OciboxError, StoreError
from ocibox.image import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    Image,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    digest_hex,
    parse_manifest,
    sha256_digest,
)
from ocibox.store import Store

CONTAINERD_NAME = "io.containerd.image.name"
_MAX_INDEX_DEPTH = 4
_CHUNK = 1 << 20


def open_layer(fileobj: BinaryIO) -> BinaryIO:
    """The uncompressed tar stream of a layer, compression detected from its first bytes."""
    head = fileobj.read(4)
    fileobj.seek(-len(head), os.SEEK_CUR)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")  # type: ignore[return-value]
    if head == b"\x28\xb5\x2f\xfd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(fileobj, read_across_frames=True)
        return reader  # type: ignore[return-value]
    return fileobj


# --- save --------------------------------------------------------------------------------------


class BlobSource(Protocol):
    """Where `write_archive` reads blobs from: the Store, or a build's new blobs over it."""

    tmp_dir: Path

    def blob_path(self, digest: str) -> Path: ...

    def open_blob(self, digest: str) -> BinaryIO: ...


def save(store: Store, refs: list[str], output: str, fmt: str = "oci-archive") -> None:
    write_archive(store, [store.load_image(ref) for ref in refs], output, fmt)


def write_archive(store: BlobSource, images: list[Image], output: str, fmt: str = "oci-archive") -> None:
    """Write `images` (their blobs read from `store`, each checked against its digest) to the
    archive file `output`, atomically. An existing pipe or device (/dev/stdout) is written to, never
    replaced. An image with an empty name is written without a name (no annotation, no RepoTags)."""
    out = Path(output)
    if not output or out.is_dir():
        raise OciboxError(f"cannot write the archive to {output!r}: give a file name, not a folder")
    with _output_errors(output):
        if out.exists() and not out.is_file():
            with open(out, "wb") as f:
                _write_tar(store, images, f, fmt, stream=True)
            return
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with _output_errors(output), os.fdopen(fd, "wb") as f:
            _write_tar(store, images, f, fmt)
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; an archive is an ordinary file
            os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _output_errors(output: str) -> Iterator[None]:
    """OS errors while writing the archive file: one line naming it (blob reads raise their own)."""
    try:
        yield
    except OSError as exc:
        raise OciboxError(f"cannot write {output}: {exc.strerror or exc}") from None


def _write_tar(store: BlobSource, images: list[Image], f: BinaryIO, fmt: str, stream: bool = False) -> None:
    with tarfile.open(fileobj=f, mode="w|" if stream else "w", format=tarfile.PAX_FORMAT) as tar:
        if fmt == "docker-archive":
            _save_docker(store, images, tar)
        else:
            _save_oci(store, images, tar)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _HashingReader:
    """A blob file read through sha256, so that a blob damaged on disk is not saved."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data


def _add_blob(tar: tarfile.TarFile, name: str, store: BlobSource, digest: str) -> None:
    path = store.blob_path(digest)
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise StoreError(f"the store is missing blob {digest}: pull the image again") from None
    except OSError as exc:
        raise StoreError(f"cannot read blob {digest} of the store: {exc.strerror or exc}") from None
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    with f:
        reader = _HashingReader(f)
        tar.addfile(info, reader)  # type: ignore[arg-type]
    if "sha256:" + reader.hash.hexdigest() != digest:
        raise IntegrityError(
            f"blob {digest} in the store is damaged (its content does not match its "
            "digest): remove the image and pull or load it again"
        )


def _save_oci(store: BlobSource, images: list[Image], tar: tarfile.TarFile) -> None:
    _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    written: set[str] = set()
    manifests = []
    for image in images:
        for digest in [image.manifest.config.digest, *(d.digest for d in image.manifest.layers)]:
            if digest not in written:
                _add_blob(tar, f"blobs/sha256/{digest_hex(digest)}", store, digest)
                written.add(digest)
        if image.manifest_digest not in written:
            _add_bytes(tar, f"blobs/sha256/{digest_hex(image.manifest_digest)}", image.manifest.raw)
            written.add(image.manifest_digest)
        annotations = {}
        if image.name:
            ref = reference.parse(image.name)
            annotations[CONTAINERD_NAME] = str(ref)
            if ref.tag:
                annotations[REF_NAME] = ref.tag
        manifests.append(
            Descriptor(
                image.manifest.media_type,
                image.manifest_digest,
                len(image.manifest.raw),
                annotations,
                image.config.platform,
            ).to_json()
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    _add_bytes(tar, "index.json", json.dumps(index, indent=2).encode())


def _save_docker(store: BlobSource, images: list[Image], tar: tarfile.TarFile) -> None:
    entries = []
    written: set[str] = set()
    repositories: dict[str, dict[str, str]] = {}
    for image in images:
        config_name = f"{digest_hex(image.id)}.json"
        if config_name not in written:
            _add_blob(tar, config_name, store, image.id)
            written.add(config_name)
        layer_names = []
        diff_ids = image.config.diff_ids
        for i, layer in enumerate(image.manifest.layers):
            diff_id = diff_ids[i] if i < len(diff_ids) else layer.digest
            name = f"{digest_hex(diff_id)}/layer.tar"
            layer_names.append(name)
            if name in written:
                continue
            with store.open_blob(layer.digest) as blob, tempfile.TemporaryFile(dir=store.tmp_dir) as plain:
                stream = open_layer(blob)
                hasher = hashlib.sha256()
                while chunk := stream.read(_CHUNK):
                    hasher.update(chunk)
                    plain.write(chunk)
                if diff_ids and "sha256:" + hasher.hexdigest() != diff_id:
                    raise IntegrityError(f"layer {layer.digest} does not match its DiffID {diff_id}")
                info = tarfile.TarInfo(name)
                info.size = plain.tell()
                info.mode = 0o644
                plain.seek(0)
                tar.addfile(info, plain)
            written.add(name)
        ref = reference.parse(image.name) if image.name else None
        tags = [ref.familiar] if ref and ref.tag and not ref.digest else []
        if ref and ref.tag:
            top = digest_hex(diff_ids[-1]) if diff_ids else ""
            repositories.setdefault(ref.familiar.rsplit(":", 1)[0], {})[ref.tag] = top
        entries.append({"Config": config_name, "RepoTags": tags, "Layers": layer_names})
    _add_bytes(tar, "manifest.json", json.dumps(entries).encode())
    _add_bytes(tar, "repositories", json.dumps(repositories).encode())


# --- load --------------------------------------------------------------------------------------


class _Archive:
    """Random access to the members of an archive file by name."""

    def __init__(self, path: str) -> None:
        if not path:
            raise NotFound("no archive file given")
        try:
            self.tar = tarfile.open(path, mode="r:*")
            self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile()}
        except FileNotFoundError:
            raise NotFound(f"no such file: {path}") from None
        except OSError as exc:
            raise IntegrityError(f"{path} is not a readable image archive: {exc.strerror or exc}") from None
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            # tarfile's "could not be opened" lists every compression it tried, one per line
            detail = str(exc) if "\n" not in str(exc) else "not a tar file (plain, gzip, bzip2 or xz)"
            raise IntegrityError(f"{path} is not a readable image archive: {detail}") from None
        self.path = path

    def open(self, name: str) -> BinaryIO:
        member = self.members.get(name.removeprefix("./"))
        if member is None:
            raise IntegrityError(f"{self.path}: the archive has no {name}")
        f = self.tar.extractfile(member)
        assert f is not None
        return f  # type: ignore[return-value]

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def close(self) -> None:
        self.tar.close()


def load(store: Store, path: str) -> list[str]:
    """Import every image of an archive; returns the names it tagged. Every image is read and
    checked before the first name is written: a bad archive tags nothing."""
    archive = _Archive(path)
    try:
        with store.using():
            if "index.json" in archive.members and "oci-layout" in archive.members:
                loaded = _load_oci(store, archive)
            elif "manifest.json" in archive.members:
                loaded = _load_docker(store, archive)
            else:
                raise IntegrityError(f"{path} is neither an oci-archive nor a docker-archive")
            for name, descriptor in loaded:
                store.tag(name, descriptor)
            return [name for name, _ in loaded]
    except (
        tarfile.TarError,
        EOFError,
        zlib.error,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
    ) as exc:
        raise IntegrityError(f"{path}: damaged archive: {exc}") from None
    except IntegrityError as exc:
        if str(exc).startswith(f"{path}:") or str(exc).startswith(f"{path} "):
            raise
        raise IntegrityError(f"{path}: {exc}") from None
    finally:
        archive.close()


def _copy_blob(store: Store, archive: _Archive, digest: str, size: int | None = None) -> None:
    if store.has_blob(digest):
        return
    with archive.open(f"blobs/sha256/{digest_hex(digest)}") as src, store.blob_writer(digest, size) as w:
        while chunk := src.read(_CHUNK):
            w.write(chunk)


def _check_config(raw: bytes) -> None:
    """An image config that ocibox can use: a JSON object whose fields have the right types."""
    ImageConfig.parse(raw)


def _load_oci(store: Store, archive: _Archive) -> list[tuple[str, Descriptor]]:
    index = parse_manifest(archive.read("index.json"))
    if not isinstance(index, Index):
        raise IntegrityError(f"{archive.path}: index.json is not an image index")
    stem = Path(archive.path).name.split(".")[0] or "image"
    names = []
    for desc in index.manifests:
        manifest_desc = desc
        raw = _read_verified(archive, desc.digest)
        node = parse_manifest(raw, desc.media_type)
        source_index = None
        depth = 0
        while isinstance(node, Index):  # an index of indexes too, as pull takes it
            depth += 1
            if depth > _MAX_INDEX_DEPTH:
                raise IntegrityError(f"{archive.path}: image indexes nested too deep")
            _copy_blob(store, archive, manifest_desc.digest, manifest_desc.size)
            source_index = source_index or manifest_desc.digest
            present = [m for m in node.manifests if f"blobs/sha256/{digest_hex(m.digest)}" in archive.members]
            manifest_desc = Index(node.media_type, present).select(Platform.host())
            raw = _read_verified(archive, manifest_desc.digest)
            node = parse_manifest(raw, manifest_desc.media_type)
        assert isinstance(node, Manifest)
        _check_config(_read_verified(archive, node.config.digest))
        store.discard_if_damaged(node.config.digest)  # a config damaged in the store is replaced
        _copy_blob(store, archive, node.config.digest, node.config.size)
        for layer in node.layers:
            _copy_blob(store, archive, layer.digest, layer.size)
        store.write_blob(raw, manifest_desc.digest)
        annotations = desc.annotations or {}
        name = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME) or "latest"
        if "/" not in name and ":" not in name:
            name = f"localhost/{stem}:{name}"
        name = str(reference.parse(name))
        extra = {"io.ocibox.source-index": source_index} if source_index else None
        tagged = Descriptor(node.media_type, manifest_desc.digest, len(raw), extra, manifest_desc.platform)
        names.append((name, tagged))
    return names


def _read_verified(archive: _Archive, digest: str) -> bytes:
    data = archive.read(f"blobs/sha256/{digest_hex(digest)}")
    if sha256_digest(data) != digest:
        raise IntegrityError(f"{archive.path}: blob {digest} does not match its digest")
    return data


def _load_docker(store: Store, archive: _Archive) -> list[tuple[str, Descriptor]]:
    entries = json.loads(archive.read("manifest.json"))
    if not isinstance(entries, list) or not entries:
        raise IntegrityError(f"{archive.path}: manifest.json lists no image")
    names = []
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("Config"), str)
            and _is_str_list(entry.get("Layers"))
            and _is_str_list(entry.get("RepoTags") or [])
        ):
            raise IntegrityError(
                f"{archive.path}: manifest.json: each image needs a Config file name "
                "and lists of Layers and RepoTags"
            )
        config_raw = archive.read(entry["Config"])
        _check_config(config_raw)
        tags = [str(reference.parse(tag)) for tag in entry.get("RepoTags") or []]
        config_digest = store.write_blob(config_raw)
        diff_ids = (json.loads(config_raw).get("rootfs") or {}).get("diff_ids") or []
        layers = [
            _import_layer(store, archive, name, diff_ids[i] if i < len(diff_ids) else None)
            for i, name in enumerate(entry["Layers"])
        ]
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
            "layers": [d.to_json() for d in layers],
        }
        raw = json.dumps(manifest, indent=2).encode()
        digest = store.write_blob(raw)
        for name in tags or [f"localhost/{digest_hex(config_digest)[:12]}:latest"]:
            names.append((name, Descriptor(OCI_MANIFEST, digest, len(raw))))
    return names


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _import_layer(store: Store, archive: _Archive, name: str, diff_id: str | None) -> Descriptor:
    """Copy one layer file in as a blob; its media type follows its compression."""
    with archive.open(name) as src:
        head = src.read(4)
    media_type = OCI_LAYER
    if head[:2] == b"\x1f\x8b":
        media_type = OCI_LAYER_GZIP
    elif head == b"\x28\xb5\x2f\xfd":
        media_type = OCI_LAYER_ZSTD
    hasher = hashlib.sha256()
    size = 0
    with archive.open(name) as src:
        while chunk := src.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    digest = "sha256:" + hasher.hexdigest()
    if media_type == OCI_LAYER and diff_id and digest != diff_id:
        raise IntegrityError(f"{archive.path}: layer {name} does not match its DiffID {diff_id}")
    if not store.has_blob(digest):
        with archive.open(name) as src, store.blob_writer(digest, size) as w:
            while chunk := src.read(_CHUNK):
                w.write(chunk)
    return Descriptor(media_type, digest, size)
