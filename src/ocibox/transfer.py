"""Moving images between a registry and the store: the only place the two meet.

`pull` fetches a reference's manifest (choosing the platform's manifest from an index), then the
config and every layer the store lacks, in parallel, each streamed into the store's verifying blob
writer under a per-blob file lock (so concurrent pulls share the work), then stores the manifest
(and the index) and tags the reference.

`push` goes the other way: blobs the repository lacks (HEAD) are mounted from another repository of
the same registry when the store knows one that has them, else uploaded (one PUT, or PATCH chunks
for big ones), in parallel, streamed from the store's files; the manifests go last.
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
    store.discard_if_damaged(manifest.config.digest)  # fetched again below
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


# --- push: store → registry ----------------------------------------------------------------------


@dataclass
class PushResult:
    name: str  # where the image went: registry/repository:tag (or @digest)
    repository: str  # registry/repository
    digest: str  # of the manifest (or the index) pushed
    media_type: str
    size: int
    whole_index: bool  # an index was pushed with all its manifests
    uploaded: int  # blobs sent
    uploaded_bytes: int
    mounted: int  # blobs linked from another repository of the registry
    present: int  # blobs the repository already had


@dataclass
class _Plan:
    """What goes up: the manifests (children first) and the top one, with its blobs."""

    top: Descriptor
    manifests: list[tuple[Descriptor, bytes]]  # every manifest, in push order; the top one last
    blobs: list[Descriptor]
    whole_index: bool


def push(
    source: str,
    store: Store,
    dest: Reference | None = None,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    jobs: int = DEFAULT_JOBS,
    chunk_size: int | None = None,
    client=None,
) -> PushResult:
    """Push the stored image `source` to `dest` (default: the registry and name it is stored as)."""
    from ocibox import reference

    progress = progress or Progress.auto(quiet=True)
    with store.using():
        name, digest = store.find(source)
        target = dest or reference.parse(name)
        plan = _plan(store, name, digest, progress)
        own_client = client is None
        client = client or registry_client(target, insecure)
        try:
            return _push(store, plan, target, client, progress, jobs, chunk_size)
        finally:
            if own_client:
                client.close()


def _plan(store: Store, name: str, digest: str, progress: Progress) -> _Plan:
    """The index whole when the store holds it and every manifest and blob under it; else the
    one manifest (with a note saying why)."""
    tagged = store.lookup(name)
    index_digest = None
    if tagged is not None:
        is_index = tagged.media_type in INDEX_TYPES and tagged.digest == digest
        index_digest = digest if is_index else (tagged.annotations or {}).get(SOURCE_INDEX)
    if index_digest and store.has_blob(index_digest):
        index_data = store.read_blob(index_digest)
        index = parse_manifest(index_data)
        if isinstance(index, Index):
            children = _complete_children(store, index)
            if children is not None:
                blobs: dict[str, Descriptor] = {}
                for _, manifest in children:
                    for desc in [manifest.config, *manifest.layers]:
                        blobs.setdefault(desc.digest, desc)
                top = Descriptor(index.media_type, index_digest, len(index_data))
                manifests = [(desc, manifest.raw) for desc, manifest in children] + [(top, index_data)]
                platforms = ", ".join(str(d.platform) for d, _ in children if d.platform)
                progress.message(f"Pushing multi-platform index {index_digest} whole ({platforms})")
                return _Plan(top, manifests, list(blobs.values()), True)
            if digest == index_digest:  # the name is the index itself: this host's image of it
                present = [
                    d for d in index.manifests if d.media_type in MANIFEST_TYPES and store.has_blob(d.digest)
                ]
                chosen = Index(index.media_type, present).select(Platform.host())
                digest, platform = chosen.digest, chosen.platform
            else:
                platform = tagged.platform if tagged is not None else None
            which = f"the {platform} image" if platform else "one image"
            progress.message(
                f"Only {which} of multi-platform index {index_digest} is in the store: "
                "pushing its manifest alone"
            )
    manifest = store.manifest(digest)
    blobs = {}
    for desc in [manifest.config, *manifest.layers]:
        blobs.setdefault(desc.digest, desc)
    _check_blobs(store, list(blobs.values()))
    top = Descriptor(manifest.media_type, digest, len(manifest.raw))
    return _Plan(top, [(top, manifest.raw)], list(blobs.values()), False)


def _complete_children(store: Store, index: Index) -> list[tuple[Descriptor, Manifest]] | None:
    """The index's manifests, if the store has each of them and all their blobs; else None."""
    out = []
    for desc in index.manifests:
        if desc.media_type not in MANIFEST_TYPES or not store.has_blob(desc.digest):
            return None
        node = parse_manifest(store.read_blob(desc.digest), desc.media_type)
        if not isinstance(node, Manifest):
            return None
        if not all(store.has_blob(d.digest) for d in [node.config, *node.layers]):
            return None
        out.append((desc, node))
    return out


def _check_blobs(store: Store, blobs: list[Descriptor]) -> None:
    for desc in blobs:
        if not store.has_blob(desc.digest):
            raise StoreError(f"the store is missing blob {desc.digest}: pull or load the image again")


def _mount_sources(store: Store, target: Reference, wanted: set[str]) -> dict[str, str]:
    """blob digest → another repository of the target's registry that should have it: the
    repositories the store's images were pulled from (or are named after)."""
    from ocibox import reference

    sources: dict[str, str] = {}
    for tagged in store.tagged():
        try:
            ref = reference.parse(tagged.name)
        except OciboxError:
            continue
        if ref.registry != target.registry or ref.repository == target.repository:
            continue
        try:
            node = parse_manifest(store.read_blob(tagged.descriptor.digest))
        except OciboxError:
            continue
        if isinstance(node, Manifest):
            for desc in [node.config, *node.layers]:
                if desc.digest in wanted:
                    sources.setdefault(desc.digest, ref.repository)
    return sources


def _push(
    store: Store,
    plan: _Plan,
    target: Reference,
    client,
    progress: Progress,
    jobs: int,
    chunk_size: int | None,
) -> PushResult:
    from ocibox.registry.client import UPLOAD_CHUNK

    repository = target.repository
    if target.digest and target.digest != plan.top.digest:
        raise IntegrityError(f"can't push to {target.familiar}: the image's digest is {plan.top.digest}")
    progress.message(f"The push refers to repository [{target.name}]")
    sources = _mount_sources(store, target, {d.digest for d in plan.blobs})
    cancel = threading.Event()
    tasks = {
        d.digest: progress.task(d.digest.partition(":")[2][:12], d.size, "Preparing") for d in plan.blobs
    }
    outcomes: dict[str, str] = {}

    def send(desc: Descriptor) -> int | None:
        task = tasks[desc.digest]
        if client.blob_exists(repository, desc.digest):
            outcomes[desc.digest] = "present"
            task.finish("Layer already exists")
            return None
        location = None
        source = sources.get(desc.digest)
        if source is not None:
            mounted, location = client.mount_blob(repository, desc.digest, source)
            if mounted:
                outcomes[desc.digest] = "mounted"
                task.finish(f"Mounted from {source}")
                return None
        _begin(progress, task)
        try:
            client.upload_blob(
                repository,
                desc.digest,
                desc.size,
                lambda: store.open_blob(desc.digest),
                chunk_size=chunk_size or UPLOAD_CHUNK,
                location=location,
                on_progress=task.update,
                cancel=cancel,
            )
        except OciboxError:
            task.finish("Failed")
            raise
        outcomes[desc.digest] = "uploaded"
        task.finish("Pushed")
        return desc.size

    try:
        results = _in_parallel([lambda d=d: send(d) for d in plan.blobs], jobs, cancel)
    finally:
        progress.close()

    # The manifests last, children before the index, so that the registry knows every reference.
    reference = target.tag or plan.top.digest
    for desc, data in plan.manifests[:-1]:
        client.put_manifest(repository, desc.digest, data, _media_type(data, desc.media_type))
    top, data = plan.manifests[-1]
    client.put_manifest(repository, reference, data, _media_type(data, top.media_type))
    tag = f"{target.tag}: " if target.tag else ""
    progress.message(f"{tag}digest: {plan.top.digest} size: {plan.top.size}")
    uploaded = [r for r in results if r is not None]
    name = f"{target.name}:{target.tag}" if target.tag else f"{target.name}@{plan.top.digest}"
    return PushResult(
        name=name,
        repository=target.name,
        digest=plan.top.digest,
        media_type=top.media_type,
        size=plan.top.size,
        whole_index=plan.whole_index,
        uploaded=len(uploaded),
        uploaded_bytes=sum(uploaded),
        mounted=sum(1 for o in outcomes.values() if o == "mounted"),
        present=sum(1 for o in outcomes.values() if o == "present"),
    )


def _media_type(data: bytes, fallback: str) -> str:
    """The manifest's own mediaType field, which the registry checks against Content-Type."""
    import json

    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        return fallback
    return value if isinstance(value, str) and value else fallback


def _begin(progress: Progress, task) -> None:
    """Mark a blob upload started (the progress bar shows "Pushing")."""
    import time

    task.status = "Pushing"
    task.started = time.monotonic()
    if progress.mode == "plain":
        from ocibox.progress import human_bytes

        progress.message(f"{task.label}: Pushing {human_bytes(task.total)}")
