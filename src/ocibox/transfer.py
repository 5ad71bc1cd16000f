"""Moving images between a registry and the store: the only place the two meet.

`pull` fetches a reference's manifest (choosing the platform's manifest from an index), then the
config and every layer the store lacks, in parallel, each streamed into the store's verifying blob
writer under a per-blob file lock (so concurrent pulls share the work), then stores the manifest
(and the index) and tags the reference. Push (store → registry) comes later, next to it.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ocibox.errors import IntegrityError, NotFound, OciboxError, StoreError
from ocibox.image import (
    DOCKER_CONFIG,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    REF_NAME,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    parse_manifest,
)
from ocibox.progress import Progress
from ocibox.reference import Reference
from ocibox.store import SOURCE_INDEX, Store

DEFAULT_JOBS = 6  # parallel blob downloads, like podman's default
MAX_INDEX_DEPTH = 4
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)


@dataclass
class PullResult:
    name: str  # the full normalised reference now tagged in the store
    manifest_digest: str
    index_digest: str | None
    platform: Platform
    downloaded: int  # blobs fetched
    downloaded_bytes: int
    present: int  # blobs the store already had


def registry_client(ref: Reference, insecure: bool = False):
    """A client for the reference's registry, with the user's stored credentials."""
    from ocibox.registry.client import RegistryClient, Transport, insecure_hosts_from_env

    def credential():
        # Read only when the registry asks: an open registry never costs the files or helpers.
        from ocibox.registry import credentials

        return credentials.lookup(ref.registry, ref.repository)

    hosts = set(insecure_hosts_from_env())
    if insecure:
        hosts |= {ref.registry, ref.api_host}
    return RegistryClient(ref.registry, ref.api_host, credential=credential, transport=Transport(hosts))


def pull(
    ref: Reference,
    store: Store,
    *,
    platform: Platform | None = None,
    insecure: bool = False,
    progress: Progress | None = None,
    jobs: int = DEFAULT_JOBS,
    client=None,
) -> PullResult:
    """Pull `ref` into `store` for `platform` (default: this host, lenient for single-platform images)."""
    progress = progress or Progress.auto(quiet=True)
    wanted = platform or Platform.host()
    own_client = client is None
    client = client or registry_client(ref, insecure)
    try:
        with store.using():
            return _pull(ref, store, client, wanted, platform is not None, progress, jobs)
    finally:
        if own_client:
            client.close()


def _pull(
    ref: Reference,
    store: Store,
    client,
    wanted: Platform,
    strict: bool,
    progress: Progress,
    jobs: int,
) -> PullResult:
    repository = ref.repository
    progress.message(f"{ref.tag or ref.digest}: Pulling from {repository}")
    top = client.get_manifest(repository, ref.identifier, what=f"manifest for {ref.familiar}")
    index_docs: list[tuple[str, bytes]] = []
    node = _parse(top.data, top.media_type, ref)
    chosen: Descriptor | None = None
    data, media_type, digest = top.data, top.media_type, top.digest
    depth = 0
    while isinstance(node, Index):
        depth += 1
        if depth > MAX_INDEX_DEPTH:
            raise IntegrityError(f"{ref.familiar}: indexes nested too deep")
        index_docs.append((digest, data))
        chosen = node.select(wanted)
        child = client.get_manifest(
            repository, chosen.digest, what=f"manifest {chosen.digest} of {ref.familiar} ({wanted})"
        )
        if len(child.data) != chosen.size:
            size = len(child.data)
            raise IntegrityError(f"manifest {chosen.digest}: {size} bytes, the index says {chosen.size}")
        data, media_type, digest = child.data, child.media_type or chosen.media_type, child.digest
        node = _parse(data, media_type, ref)
    manifest: Manifest = node

    blobs: dict[str, Descriptor] = {}
    for desc in [manifest.config, *manifest.layers]:
        blobs.setdefault(desc.digest, desc)
    fetched = _fetch_blobs(client, store, repository, list(blobs.values()), progress, jobs)

    config = ImageConfig.parse(store.read_blob(manifest.config.digest))
    image_platform = chosen.platform if chosen is not None and chosen.platform else config.platform
    if chosen is None and not wanted.matches(config.platform):
        note = f"the image's platform ({config.platform}) does not match the requested one ({wanted})"
        if strict:
            raise NotFound(f"{ref.familiar}: {note}")
        progress.message(f"WARNING: {note}")

    store.write_blob(data, digest)
    for index_digest, index_data in index_docs:
        store.write_blob(index_data, index_digest)
    annotations = {SOURCE_INDEX: index_docs[0][0]} if index_docs else None
    manifest_type = manifest.media_type if manifest.media_type in MANIFEST_TYPES else media_type
    descriptor = Descriptor(manifest_type, digest, len(data), annotations, image_platform)
    name = str(ref)
    if store.lookup(name) == descriptor.with_annotations({**(annotations or {}), REF_NAME: name}):
        store.mark_used(digest)  # already tagged so: no index.json rewrite (and its fsyncs)
    else:
        store.tag(name, descriptor)

    downloaded = [d for d in fetched if d is not None]
    progress.message(f"Digest: {index_docs[0][0] if index_docs else digest}")
    status = "Downloaded newer image for" if downloaded else "Image is up to date for"
    progress.message(f"Status: {status} {ref.familiar}")
    return PullResult(
        name=name,
        manifest_digest=digest,
        index_digest=index_docs[0][0] if index_docs else None,
        platform=image_platform,
        downloaded=len(downloaded),
        downloaded_bytes=sum(downloaded),
        present=len(fetched) - len(downloaded),
    )


def _parse(data: bytes, media_type: str, ref: Reference) -> Manifest | Index:
    """The manifest or index; schema 1 and non-image artifacts (Helm charts, signatures…) refused."""
    node = parse_manifest(data, media_type or None)
    kind = node.media_type
    if kind not in MANIFEST_TYPES + INDEX_TYPES:
        raise IntegrityError(f"{ref.familiar} is not a container image (manifest type {kind})")
    if isinstance(node, Manifest) and node.config.media_type not in CONFIG_TYPES:
        config_type = node.config.media_type
        raise IntegrityError(f"{ref.familiar} is not a container image (config type {config_type})")
    return node


def _fetch_blobs(
    client,
    store: Store,
    repository: str,
    blobs: list[Descriptor],
    progress: Progress,
    jobs: int,
) -> list[int | None]:
    """Fetch every blob the store lacks, `jobs` at a time. For each blob: bytes fetched, or None
    when it was already there. The first failure cancels the rest and is raised."""
    cancel = threading.Event()
    tasks = {d.digest: progress.task(d.digest.partition(":")[2][:12], d.size) for d in blobs}

    def fetch(desc: Descriptor) -> int | None:
        return _fetch_one(client, store, repository, desc, tasks[desc.digest], progress, cancel)

    missing = [d for d in blobs if not store.has_blob(d.digest)]
    for desc in blobs:
        if desc not in missing:
            tasks[desc.digest].finish("Already exists")
    results = _in_parallel([lambda d=d: fetch(d) for d in missing], jobs, cancel)
    progress.close()
    return results + [None] * (len(blobs) - len(missing))


def _in_parallel(jobs: list[Callable[[], int | None]], workers: int, cancel: threading.Event) -> list:
    """Run `jobs` on up to `workers` threads; the first failure (or Ctrl-C) sets `cancel`, the
    others stop at their next chunk, and that failure is raised once every thread has ended.
    (Plain threads: concurrent.futures would import logging and more on every pull.)"""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    order = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker() -> None:
        while not cancel.is_set():
            with lock:
                index = next(order, None)
            if index is None:
                return
            try:
                results[index] = jobs[index]()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                errors.append(exc)
                cancel.set()
                return

    threads = [
        threading.Thread(target=worker, name="pull", daemon=True) for _ in range(min(workers, len(jobs)))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        cancel.set()
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise _first_error(errors)
    return results


def _first_error(errors: list[BaseException]) -> BaseException:
    from ocibox.registry.client import Cancelled

    real = [e for e in errors if not isinstance(e, Cancelled)]
    return (real or errors)[0]


def _fetch_one(
    client,
    store: Store,
    repository: str,
    desc: Descriptor,
    task,
    progress: Progress,
    cancel: threading.Event,
) -> int | None:
    digest = desc.digest
    with store.blob_lock(digest):
        if store.has_blob(digest):  # another process fetched it while we waited for the lock
            task.finish("Already exists")
            return None
        progress.start(task)
        update: Callable[[int], None] = task.update
        try:
            with store.blob_writer(digest, desc.size) as writer:
                client.fetch_blob(repository, digest, desc.size, writer, update, cancel)
        except OSError as exc:
            raise _store_error(exc, digest) from None
        except OciboxError:
            task.finish("Failed")
            raise
    task.finish("Pull complete")
    return desc.size


def _store_error(exc: OSError, digest: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on device while writing blob {digest}")
    where = f" ({exc.filename})" if exc.filename else ""
    return StoreError(f"cannot write blob {digest}: {exc.strerror or exc}{where}")
