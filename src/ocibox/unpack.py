"""Root filesystems of stored images: the shared cache, and bundles a user can edit.

`ensure_rootfs` keeps one unpacked rootfs per image under `store.rootfs_dir/<chain-id-hex>/`,
keyed by the ChainID of the top layer (image-spec: ChainID(L0) = DiffID(L0), ChainID(Ln) =
sha256(ChainID(Ln-1) + " " + DiffID(Ln))). It is built in a folder under `store.tmp_dir` and
renamed into place only when complete, so an interrupted unpack never leaves a rootfs that looks
done; a flock on `<chain-id-hex>.lock` keeps two processes from unpacking the same image twice, and
an image already unpacked costs one stat. Unpacked as a user, the image's owners and modes are in
`<chain-id-hex>.meta` beside it (see ocibox.layers).

`make_bundle` writes an OCI runtime bundle: DEST/rootfs (the layers unpacked straight into it) and
DEST/config.json (ocibox.spec; rootless when not root). DEST is made 0700: the rootfs may hold
setuid programs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ocibox import userns
from ocibox.errors import IntegrityError, NotFound, OciboxError
from ocibox.image import Image, digest_hex
from ocibox.layers import apply_layers, meta_path
from ocibox.spec import RunOptions, runtime_config
from ocibox.store import Store, atomic_write, flock, remove_tree


def _layer_files(store: Store, image: Image) -> list[tuple[Path, str]]:
    diff_ids = image.config.diff_ids
    layers = image.manifest.layers
    if len(diff_ids) != len(layers):
        raise IntegrityError(
            f"{image.name}: the manifest has {len(layers)} layers but the config lists "
            f"{len(diff_ids)} diff_ids"
        )
    out = []
    for desc, diff_id in zip(layers, diff_ids, strict=True):
        path = store.blob_path(desc.digest)
        if not path.exists():
            raise NotFound(f"{image.name}: layer {desc.digest} is not in the store; pull the image again")
        out.append((path, diff_id))
    return out


def rootfs_path(store: Store, image: Image) -> Path:
    return store.rootfs_dir / digest_hex(image.chain_id)


def ensure_rootfs(store: Store, image: Image) -> Path:
    """The cached rootfs of `image`, unpacked first if needed."""
    target = rootfs_path(store, image)
    if target.is_dir():
        return target
    store.ensure()
    layers = _layer_files(store, image)
    with flock(store.rootfs_dir / f"{target.name}.lock"):
        if target.is_dir():  # another process finished it while we waited
            return target
        work = Path(tempfile.mkdtemp(prefix=f"rootfs-{target.name[:12]}-", dir=store.tmp_dir))
        try:
            if os.geteuid() != 0 and not userns.mappings().single:
                # as root of a user namespace with the user's subordinate ids: real owners on disk,
                # the ones the container's own user namespace shows (as podman stores images)
                userns.run_as_root(_build, work, layers, target, False)
            else:
                _build(work, layers, target, os.geteuid() != 0)
        finally:
            remove_tree(work)
    return target


def _build(work: Path, layers: list[tuple[Path, str]], target: Path, rootless: bool) -> None:
    root = work / "rootfs"
    try:
        apply_layers(root, layers, rootless=rootless)
        meta = meta_path(root)
        if meta.exists():
            os.replace(meta, meta_path(target))
        os.rename(root, target)
    except BaseException:
        remove_tree(work)  # inside the namespace: files may belong to subordinate ids
        raise


def make_bundle(store: Store, image: Image, dest: Path, opts: RunOptions | None = None) -> Path:
    """An OCI runtime bundle of `image` in `dest` (which must not exist or be empty)."""
    dest = Path(dest)
    if opts is None:
        # user-owned files (umoci's way, a folder the user can edit and delete) and the one mapping
        # that shows them as root's; the image's owners are in rootfs.meta and the xattr
        rootless = os.geteuid() != 0
        single = [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
        single_gid = [{"containerID": 0, "hostID": os.getegid(), "size": 1}]
        opts = RunOptions(
            rootless=rootless,
            uid_mappings=single if rootless else None,
            gid_mappings=single_gid if rootless else None,
        )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OciboxError(f"{dest} already exists and is not an empty folder")
    layers = _layer_files(store, image)
    created = not dest.exists()
    try:
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        dest.chmod(0o700)
    except OSError as e:
        raise OciboxError(f"cannot create {dest}: {e.strerror}") from None
    partial = dest / ".rootfs.partial"
    try:
        apply_layers(partial, layers, rootless=opts.rootless or os.geteuid() != 0)
        meta = meta_path(partial)
        if meta.exists():
            os.replace(meta, dest / "rootfs.meta")
        os.rename(partial, dest / "rootfs")
    except BaseException:
        remove_tree(partial)
        meta_path(partial).unlink(missing_ok=True)
        if created:  # a failed unpack leaves no folder it made
            remove_tree(dest)
        raise
    config = runtime_config(image.config.raw, opts, rootfs=dest / "rootfs")
    config["annotations"] = {
        **config.get("annotations", {}),
        "org.opencontainers.image.ref.name": image.name,
        "ocibox.image.manifest": image.manifest_digest,
    }
    atomic_write(dest / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return dest
