"""Write OCI image layouts byte for byte the same every time: deterministic tar + gzip/zstd layers.

The test images are built here, in Python, then handed to skopeo. Everything that goes into a
digest is fixed: entry order, mtimes, owners (numeric only), gzip header (no name, mtime 0), JSON
key order and separators.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# 2024-01-01T00:00:00Z: the mtime of every entry the tests write themselves.
EPOCH = 1704067200
CREATED = "2024-01-01T00:00:00Z"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

LAYER_MEDIA_TYPES = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, None: OCI_LAYER}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `target` (if any)."""

    def __init__(self, target=None):
        super().__init__()
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        self.hash.update(b)
        self.size += len(b)
        if self.target is not None:
            self.target.write(b)
        return len(b)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


@dataclass
class Entry:
    """One tar entry written by the tests. `path` is relative ("bin/busybox")."""

    path: str
    kind: str = "file"  # file, dir, symlink, hardlink
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    source: Path | None = None  # a file to copy the data from instead of `data`
    link: str = ""

    def tarinfo(self) -> tuple[tarfile.TarInfo, object]:
        info = tarfile.TarInfo(self.path)
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        info.mtime = EPOCH
        body = None
        if self.kind == "file":
            info.type = tarfile.REGTYPE
            data = self.source.read_bytes() if self.source is not None else self.data
            info.size = len(data)
            body = io.BytesIO(data)
        elif self.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif self.kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = self.link
        elif self.kind == "hardlink":
            info.type = tarfile.LNKTYPE
            info.linkname = self.link
        else:
            raise ValueError(f"unknown entry kind {self.kind!r}")
        return info, body


def whiteout(path: str) -> Entry:
    """The entry that deletes `path` (a file or a whole folder) from the layers below."""
    parent, _, name = path.rpartition("/")
    return Entry((parent + "/" if parent else "") + ".wh." + name, "file", 0o644)


@dataclass
class LayerBlob:
    digest: str
    size: int
    diff_id: str
    media_type: str
    unpacked_size: int = 0  # bytes of the uncompressed tar stream
    entries: int = 0

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class Layout:
    """An OCI image layout being written at `path` (oci-layout, index.json, blobs/sha256)."""

    path: Path
    manifests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def add_blob(self, data: bytes, media_type: str) -> dict:
        digest = sha256_digest(data)
        target = self.blob_path(digest)
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_json(self, doc: dict, media_type: str) -> dict:
        return self.add_blob(canonical_json(doc), media_type)

    def add_layer(
        self, fill: Callable[[tarfile.TarFile], None], compression: str | None = "gzip"
    ) -> LayerBlob:
        """Write one layer: `fill(tar)` adds the entries; the blob is compressed as asked."""
        tmp = self.path / "blobs" / "sha256" / f".layer-{os.getpid()}.tmp"
        with open(tmp, "wb") as out:
            outer = HashingWriter(out)
            if compression == "gzip":
                compressor = gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=6)
            elif compression == "zstd":
                import zstandard

                compressor = zstandard.ZstdCompressor(level=3).stream_writer(outer, closefd=False)
            elif compression is None:
                compressor = outer
            else:
                raise ValueError(f"unknown compression {compression!r}")
            inner = HashingWriter(compressor)
            with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                fill(tar)
                entries = len(tar.members)
            if compressor is not outer:
                compressor.close()
        blob = LayerBlob(
            digest=outer.digest,
            size=outer.size,
            diff_id=inner.digest,
            media_type=LAYER_MEDIA_TYPES[compression],
            unpacked_size=inner.size,
            entries=entries,
        )
        os.replace(tmp, self.blob_path(blob.digest))
        return blob

    def add_entries_layer(self, entries: list[Entry], compression: str | None = "gzip") -> LayerBlob:
        def fill(tar: tarfile.TarFile) -> None:
            for entry in entries:
                info, body = entry.tarinfo()
                tar.addfile(info, body)

        return self.add_layer(fill, compression)

    def add_image(
        self,
        layers: list[LayerBlob],
        config: dict,
        ref_name: str | None,
        platform: dict | None = None,
        history: list[str] | None = None,
    ) -> dict:
        """Write config + manifest for `layers`; returns the manifest descriptor (with platform).

        With `ref_name`, the manifest is also listed in index.json under that tag.
        """
        config = dict(config)
        config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
        config["history"] = [
            {"created": CREATED, "created_by": line} for line in (history or ["ocibox tests"] * len(layers))
        ]
        config_desc = self.add_json(config, OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc,
            "layers": [layer.descriptor() for layer in layers],
        }
        desc = self.add_json(manifest, OCI_MANIFEST)
        if platform is not None:
            desc["platform"] = platform
        if ref_name is not None:
            self.tag(desc, ref_name)
        return desc

    def add_index(self, manifests: list[dict], ref_name: str) -> dict:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        desc = self.add_json(index, OCI_INDEX)
        self.tag(desc, ref_name)
        return desc

    def tag(self, desc: dict, ref_name: str) -> None:
        entry = {k: v for k, v in desc.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
        self.manifests = [
            m for m in self.manifests if m["annotations"]["org.opencontainers.image.ref.name"] != ref_name
        ]
        self.manifests.append(entry)
        self.write_index()

    def write_index(self) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.manifests}
        tmp = self.path / "index.json.tmp"
        tmp.write_bytes(canonical_json(index))
        os.replace(tmp, self.path / "index.json")
