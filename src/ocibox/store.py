"""The local store: an OCI image layout on disk, plus ocibox's caches beside it.

    $OCIBOX_ROOT (default $XDG_DATA_HOME/ocibox)
      oci-layout, index.json   OCI image layout; a tag is the full normalised reference in
                               the descriptor's org.opencontainers.image.ref.name annotation
      blobs/sha256/<hex>       manifests, configs, layers, exactly as pulled
      rootfs/<chain-id-hex>/   unpacked root filesystems (read-only lower layers)
      containers/<id>/         kept containers
      used/<manifest-hex>      empty files whose mtime says when an image was last used
      tmp/                     downloads and unpacks in progress (same filesystem: atomic rename)

Rules: a blob appears under blobs/ only after its digest and size were verified; every write is
temp + fsync + rename; processes coordinate with flock: one lock per blob download, one for
index.json, and a shared/exclusive "gc" lock so that a prune never deletes what a pull is writing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ocibox import locations
from ocibox.errors import IntegrityError, NotFound, StoreError
from ocibox.image import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    REF_NAME,
    Descriptor,
    Image,
    ImageConfig,
    Index,
    Manifest,
    digest_hex,
    parse_manifest,
)

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
_SMALL_BLOB = 16 << 20  # manifests and configs: blobs checked whole when read
# Annotation on a tagged manifest pulled through an index: the index digest, kept so that
# `save` can write the index whole and GC keeps it.
SOURCE_INDEX = "io.ocibox.source-index"


def default_root() -> Path:
    return Path(locations.default_root())


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """Turn OS errors of the store into one clear StoreError line."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"{what}: no space left on device{where}") from None
        raise StoreError(f"{what}: {exc.strerror or exc}{where}") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def flock(path: Path, shared: bool = False) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a folder even where the image (or overlayfs's work dir) made parts of it unreadable.
    Raises OSError for what this user can't remove (files other users own)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    for dirpath, dirnames, _ in os.walk(path):  # top-down: children opened before descending
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):
                    os.chmod(full, stat.S_IRWXU)
    shutil.rmtree(path)


def _remove_unpacked(path: Path) -> None:
    """Remove an unpacked rootfs; a user's holds files of their subordinate ids (see unpack.py),
    which only the user namespace that wrote them can remove."""
    try:
        remove_tree(path)
    except OSError:
        if os.geteuid() == 0:
            raise
        from ocibox import userns

        userns.run_as_root(remove_tree, path)


class BlobWriter:
    """A blob being written: bytes go to a temp file and through sha256; commit() verifies them.

    `offset` is how many bytes are already written (a resumed download asks for the rest with
    Range); `reset()` starts over when the server can't resume.
    """

    def __init__(self, store: Store, digest: str, size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix=f"blob-{digest_hex(digest)[:16]}-")
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        if self.size is not None and self.offset + len(data) > self.size:
            raise IntegrityError(f"blob {self.digest}: more bytes than the expected {self.size}")
        with _store_errors(f"cannot write blob {self.digest}"):
            self._file.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def reset(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.offset = 0

    def commit(self) -> None:
        if self.size is not None and self.offset != self.size:
            raise IntegrityError(f"blob {self.digest}: got {self.offset} bytes, expected {self.size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise IntegrityError(f"blob {self.digest}: content does not match its digest (got {actual})")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.path, 0o444)
        os.replace(self.path, self.store.blob_path(self.digest))
        fsync_dir(self.store.blobs_dir)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass(frozen=True)
class Tagged:
    """One entry of index.json: a name and what it points at."""

    name: str
    descriptor: Descriptor


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.rootfs_dir = self.root / "rootfs"
        self.containers_dir = self.root / "containers"
        self.used_dir = self.root / "used"
        self._ready = False

    @classmethod
    def default(cls) -> Store:
        return cls(default_root())

    # --- layout ------------------------------------------------------------------------------

    def ensure(self) -> Store:
        """Create the layout on first use."""
        if self._ready:
            return self
        with _store_errors(f"cannot create the store at {self.root}"):
            for d in (self.blobs_dir, self.tmp_dir, self.rootfs_dir, self.containers_dir, self.used_dir):
                d.mkdir(parents=True, exist_ok=True)
            layout = self.root / "oci-layout"
            if not layout.exists():
                atomic_write(layout, json.dumps(LAYOUT_VERSION).encode())
            index = self.root / "index.json"
            if not index.exists():
                with flock(self.root / "index.lock"):
                    if not index.exists():
                        self._write_index([])
        self._ready = True
        return self

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Held (shared) while writing blobs that are not tagged yet; GC waits for it."""
        self.ensure()
        with flock(self.root / "gc.lock", shared=True):
            yield

    # --- blobs -------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        if algorithm != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
            raise IntegrityError(f"unsupported or malformed digest {digest!r}")
        return self.blobs_dir / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store") from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {digest} of the store: {exc.strerror or exc}") from None

    def read_blob(self, digest: str) -> bytes:
        """A small blob (manifest, index, config), checked against its digest: a blob changed on
        disk is refused rather than believed."""
        with self.open_blob(digest) as f:
            data = f.read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(
                f"blob {digest} in the store is damaged (its content does not match "
                "its digest): pull or load the image again"
            )
        return data

    def discard_if_damaged(self, digest: str) -> None:
        """Remove a small blob (manifest, config) whose content no longer matches its digest, so
        that a pull fetches it again instead of finding it "already there"."""
        try:
            with self.open_blob(digest) as f:
                data = f.read(_SMALL_BLOB + 1)
        except (NotFound, StoreError):
            return
        if len(data) <= _SMALL_BLOB and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            with _store_errors(f"cannot remove the damaged blob {digest}"):
                self.blob_path(digest).unlink()

    def write_blob(self, data: bytes, expected_digest: str | None = None) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if expected_digest is not None and expected_digest != digest:
            raise IntegrityError(f"blob {expected_digest}: content does not match its digest (got {digest})")
        self.ensure()
        self.discard_if_damaged(digest)
        if not self.has_blob(digest):
            with _store_errors(f"cannot write blob {digest}"), self.blob_writer(digest, len(data)) as w:
                w.write(data)
        return digest

    @contextlib.contextmanager
    def blob_writer(self, digest: str, size: int | None = None) -> Iterator[BlobWriter]:
        """Write a blob: verified and renamed into blobs/ on a clean exit, discarded otherwise."""
        self.ensure()
        self.blob_path(digest)
        with _store_errors(f"cannot write blob {digest}"):
            writer = BlobWriter(self, digest, size)
        try:
            yield writer
            with _store_errors(f"cannot write blob {digest}"):
                writer.commit()
        finally:
            writer.discard()

    @contextlib.contextmanager
    def blob_lock(self, digest: str) -> Iterator[None]:
        """One process at a time downloads a given blob; the others then find it present."""
        self.ensure()
        with flock(self.tmp_dir / f"{digest_hex(digest)}.lock"):
            yield

    # --- index.json: names ---------------------------------------------------------------------

    def _read_index(self) -> list[Descriptor]:
        try:
            doc = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {self.root / 'index.json'}: {exc}") from None
        manifests = doc.get("manifests") if isinstance(doc, dict) else "not an object"
        if not isinstance(manifests, list | None):
            raise StoreError(f"{self.root / 'index.json'} is damaged: not an image index")
        try:
            return [Descriptor.from_json(d) for d in manifests or []]
        except IntegrityError as exc:
            raise StoreError(f"{self.root / 'index.json'} is damaged: {exc}") from None

    def _write_index(self, manifests: list[Descriptor]) -> None:
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [d.to_json() for d in manifests],
        }
        atomic_write(self.root / "index.json", json.dumps(doc, indent=2).encode())

    def tagged(self) -> list[Tagged]:
        from ocibox import reference
        from ocibox.errors import InvalidReference

        self.ensure()
        out = [
            Tagged(d.annotations[REF_NAME], d)
            for d in self._read_index()
            if d.annotations and d.annotations.get(REF_NAME)
        ]
        for t in out:
            try:
                reference.parse(t.name)
            except InvalidReference:
                raise StoreError(
                    f"{self.root / 'index.json'} is damaged: {t.name!r} is not an image name"
                ) from None
        return out

    def tag(self, name: str, descriptor: Descriptor) -> None:
        """Point `name` (a full normalised reference) at `descriptor`, replacing what it named."""
        self.ensure()
        annotations = dict(descriptor.annotations or {})
        annotations[REF_NAME] = name
        entry = descriptor.with_annotations(annotations)
        with _store_errors("cannot update index.json"), flock(self.root / "index.lock"):
            kept = [d for d in self._read_index() if (d.annotations or {}).get(REF_NAME) != name]
            self._write_index([*kept, entry])
        self.mark_used(descriptor.digest)

    def untag(self, name: str) -> Descriptor:
        self.ensure()
        with _store_errors("cannot update index.json"), flock(self.root / "index.lock"):
            entries = self._read_index()
            gone = [d for d in entries if (d.annotations or {}).get(REF_NAME) == name]
            if not gone:
                raise NotFound(f"no such image: {name}")
            self._write_index([d for d in entries if d not in gone])
        return gone[0]

    def lookup(self, name: str) -> Descriptor | None:
        for t in self.tagged():
            if t.name == name:
                return t.descriptor
        return None

    # --- images ------------------------------------------------------------------------------

    def load_image(self, ref_text: str) -> Image:
        """The stored image that `ref_text` names: a reference, a manifest digest, or an image ID
        (config digest, or a prefix of 12+ hex digits of it) as Docker accepts."""
        name, manifest_digest = self.find(ref_text)
        try:
            manifest = self.manifest(manifest_digest)
            config = ImageConfig.parse(self.read_blob(manifest.config.digest))
        except NotFound:
            raise StoreError(
                f"{name}: the store is missing its config {manifest.config.digest}: pull the image again"
            ) from None
        except (IntegrityError, StoreError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        return Image(name, manifest_digest, manifest, config)

    def find(self, ref_text: str) -> tuple[str, str]:
        """(name, manifest digest) of a stored image, or NotFound."""
        from ocibox import reference

        self.ensure()
        tagged = self.tagged()
        candidate = ref_text.removeprefix("sha256:")
        if len(candidate) >= 12 and all(c in "0123456789abcdef" for c in candidate):
            for t in tagged:
                if digest_hex(t.descriptor.digest).startswith(candidate):
                    return t.name, t.descriptor.digest
                with contextlib.suppress(StoreError, NotFound, IntegrityError):
                    if digest_hex(self.manifest(t.descriptor.digest).config.digest).startswith(candidate):
                        return t.name, t.descriptor.digest
        ref = reference.parse(ref_text)
        if ref.digest is None:
            desc = self.lookup(str(ref))
            if desc is None:
                raise NotFound(f"image {ref.familiar} is not in the store")
            return str(ref), desc.digest
        for t in tagged:
            source_index = (t.descriptor.annotations or {}).get(SOURCE_INDEX)
            if ref.digest in (t.descriptor.digest, source_index):
                return t.name, t.descriptor.digest
        if self.has_blob(ref.digest):
            return str(ref), self._platform_manifest(ref.digest)
        raise NotFound(f"image {ref.familiar} is not in the store")

    def _platform_manifest(self, digest: str) -> str:
        node = parse_manifest(self.read_blob(digest))
        if isinstance(node, Index):
            from ocibox.image import Platform

            return self._platform_manifest(node.select(Platform.host()).digest)
        return digest

    def manifest(self, digest: str) -> Manifest:
        try:
            data = self.read_blob(digest)
        except NotFound:
            raise StoreError(f"the store is missing manifest {digest}: pull the image again") from None
        try:
            node = parse_manifest(data)
        except IntegrityError as exc:
            raise IntegrityError(f"manifest {digest} in the store: {exc}") from None
        if not isinstance(node, Manifest):
            raise IntegrityError(f"{digest} is an index, not an image manifest")
        return node

    def mark_used(self, manifest_digest: str) -> None:
        with contextlib.suppress(OSError):
            self.used_dir.mkdir(parents=True, exist_ok=True)
            path = self.used_dir / digest_hex(manifest_digest)
            path.touch()
            os.utime(path)

    def last_used(self, manifest_digest: str) -> float:
        try:
            return (self.used_dir / digest_hex(manifest_digest)).stat().st_mtime
        except OSError:
            return 0.0

    # --- garbage collection ----------------------------------------------------------------------

    def referenced(self) -> tuple[set[str], set[str]]:
        """(blob digests, rootfs chain-id hexes) that the tagged images need."""
        blobs: set[str] = set()
        chains: set[str] = set()
        todo = [t.descriptor.digest for t in self.tagged()]
        todo += [
            t.descriptor.annotations[SOURCE_INDEX]
            for t in self.tagged()
            if t.descriptor.annotations and SOURCE_INDEX in t.descriptor.annotations
        ]
        while todo:
            digest = todo.pop()
            if digest in blobs:
                continue
            blobs.add(digest)
            if not self.has_blob(digest):
                continue
            try:
                node = parse_manifest(self.read_blob(digest))
            except IntegrityError:
                continue
            if isinstance(node, Index):
                todo += [
                    d.digest
                    for d in node.manifests
                    if d.media_type in MANIFEST_TYPES + INDEX_TYPES and self.has_blob(d.digest)
                ]
            else:
                blobs.add(node.config.digest)
                blobs.update(layer.digest for layer in node.layers)
                with contextlib.suppress(StoreError, NotFound, IntegrityError):
                    config = ImageConfig.parse(self.read_blob(node.config.digest))
                    image = Image("", digest, node, config)
                    chains.add(digest_hex(image.chain_id))
        return blobs, chains

    def gc(self) -> tuple[int, int]:
        """Delete blobs and unpacked root filesystems that no tagged image needs.
        Returns (files removed, bytes freed)."""
        self.ensure()
        removed = freed = 0
        with _store_errors("cannot clean the store"), flock(self.root / "gc.lock"):
            keep, chains = self.referenced()
            keep_hex = {digest_hex(d) for d in keep}
            for blob in self.blobs_dir.iterdir():
                if blob.name not in keep_hex:
                    freed += blob.stat().st_size
                    blob.unlink()
                    removed += 1
            for rootfs in self.rootfs_dir.iterdir():
                name = rootfs.name.split(".", 1)[0]
                if name not in chains or rootfs.name.startswith("."):
                    _remove_unpacked(rootfs)
                    removed += 1
            for used in self.used_dir.iterdir():
                if used.name not in keep_hex:
                    used.unlink()
            now = time.time()
            for tmp in self.tmp_dir.iterdir():
                # Leftovers of killed processes; locks and recent temp files may be in use.
                if not tmp.name.endswith(".lock") and now - tmp.lstat().st_mtime > 3600:
                    remove_tree(tmp)
        return removed, freed
