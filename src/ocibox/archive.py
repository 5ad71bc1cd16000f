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
from pathlib import Path
from typing import BinaryIO, Protocol

from ocibox import reference
from ocibox.errors import IntegrityError, NotFound
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
    Index,
    Manifest,
    Platform,
    digest_hex,
    parse_manifest,
    sha256_digest,
)
from ocibox.store import Store

CONTAINERD_NAME = "io.containerd.image.name"
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
    """Write `images` (their blobs read from `store`) to the archive file `output`, atomically.
    An image with an empty name is written without a name (no annotation, no RepoTags)."""
    out = Path(output)
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            if fmt == "docker-archive":
                _save_docker(store, images, tar)
            else:
                _save_oci(store, images, tar)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; an archive is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    with open(path, "rb") as f:
        tar.addfile(info, f)


def _save_oci(store: BlobSource, images: list[Image], tar: tarfile.TarFile) -> None:
    _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    written: set[str] = set()
    manifests = []
    for image in images:
        for digest in [image.manifest.config.digest, *(d.digest for d in image.manifest.layers)]:
            if digest not in written:
                _add_file(tar, f"blobs/sha256/{digest_hex(digest)}", store.blob_path(digest))
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
            _add_file(tar, config_name, store.blob_path(image.id))
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
        try:
            self.tar = tarfile.open(path, mode="r:*")
            self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile()}
        except FileNotFoundError:
            raise NotFound(f"no such file: {path}") from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise IntegrityError(f"{path} is not a readable image archive: {exc}") from None
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
    """Import every image of an archive; returns the names it tagged."""
    archive = _Archive(path)
    try:
        with store.using():
            if "index.json" in archive.members and "oci-layout" in archive.members:
                return _load_oci(store, archive)
            if "manifest.json" in archive.members:
                return _load_docker(store, archive)
            raise IntegrityError(f"{path} is neither an oci-archive nor a docker-archive")
    except (tarfile.TarError, EOFError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{path}: damaged archive: {exc}") from None
    finally:
        archive.close()


def _copy_blob(store: Store, archive: _Archive, digest: str, size: int | None = None) -> None:
    if store.has_blob(digest):
        return
    with archive.open(f"blobs/sha256/{digest_hex(digest)}") as src, store.blob_writer(digest, size) as w:
        while chunk := src.read(_CHUNK):
            w.write(chunk)


def _load_oci(store: Store, archive: _Archive) -> list[str]:
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
        if isinstance(node, Index):
            _copy_blob(store, archive, desc.digest, desc.size)
            source_index = desc.digest
            present = [m for m in node.manifests if f"blobs/sha256/{digest_hex(m.digest)}" in archive.members]
            manifest_desc = Index(node.media_type, present).select(Platform.host())
            raw = _read_verified(archive, manifest_desc.digest)
            node = parse_manifest(raw, manifest_desc.media_type)
        assert isinstance(node, Manifest)
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
        store.tag(name, tagged)
        names.append(name)
    return names


def _read_verified(archive: _Archive, digest: str) -> bytes:
    data = archive.read(f"blobs/sha256/{digest_hex(digest)}")
    if sha256_digest(data) != digest:
        raise IntegrityError(f"{archive.path}: blob {digest} does not match its digest")
    return data


def _load_docker(store: Store, archive: _Archive) -> list[str]:
    entries = json.loads(archive.read("manifest.json"))
    if not isinstance(entries, list) or not entries:
        raise IntegrityError(f"{archive.path}: manifest.json lists no image")
    names = []
    for entry in entries:
        config_raw = archive.read(entry["Config"])
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
        tags = entry.get("RepoTags") or [f"localhost/{digest_hex(config_digest)[:12]}:latest"]
        for tag in tags:
            name = str(reference.parse(tag))
            store.tag(name, Descriptor(OCI_MANIFEST, digest, len(raw)))
            names.append(name)
    return names


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
