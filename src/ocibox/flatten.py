"""An image's layers merged into one squashfs tree, file data streamed straight into the writer.

    tree = flatten(writer, [(layer_path, diff_id), ...])   # lowest layer first, as in the manifest
    writer.finish(tree)

Layers are read from the TOP one down, so nothing is ever unpacked to disk and no file content is
read twice: an entry of a lower layer is kept only if no upper layer already gave that path, removed
it by a whiteout (`.wh.NAME`), hid its folder's lower contents (`.wh..wh..opq`), or put a
non-directory at one of its ancestors. Within one layer, whiteouts hide lower layers only, and of
two entries for one path the later wins (a folder over a folder keeps both contents), as
layers.py applies changesets. Names are cleaned with the same rules as layers.py (absolute names
rooted, `..` above the root refused).

Hard links are resolved at the end of the walk: a link's target is the first entry of that path met
from the link's own layer downwards (the file as it was when the link's layer was made), and both
paths become one inode. Owners, modes, mtimes and xattrs (SCHILY.xattr PAX records) are kept.
Each layer's DiffID is checked as it streams.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ocibox.errors import IntegrityError, LayerError
from ocibox.layers import OPAQUE, WHITEOUT_PREFIX, LayerStream, clean_name, tar_xattrs
from ocibox.squashfs import Device, Dir, Fifo, File, Node, SquashfsWriter, Symlink


@dataclass(eq=False, kw_only=True)
class _Implicit(Dir):
    """A folder made only because a lower layer has something inside it; its own entry (if a
    lower layer has one) gives its attributes later."""


@dataclass
class _Link:
    parent: Dir
    name: str
    layer: int


@dataclass
class _Layer:
    """What one layer decided; applied to the lower layers once the layer has been read."""

    index: int
    provided: set[str] = field(default_factory=set)
    cut: set[str] = field(default_factory=set)
    seen: dict[str, Node] = field(default_factory=dict)  # this layer's nodes, for links to them
    skipped: set[str] = field(default_factory=set)  # this layer's files that upper layers hide
    late: dict[str, list[_Link]] = field(default_factory=dict)  # links to skipped files: read again


@dataclass
class _State:
    root: Dir
    provided: set[str] = field(default_factory=set)  # paths decided by upper layers
    cut: set[str] = field(default_factory=set)  # paths whose lower contents are hidden
    links: dict[str, list[_Link]] = field(default_factory=dict)  # target path -> links waiting
    entries: int = 0
    capture: tuple[str, ...] = ()
    captured: dict[str, bytes] = field(default_factory=dict)
    relinks: list[tuple[Dir, str, Symlink, str]] = field(default_factory=list)  # see _relink


def flatten(
    writer: SquashfsWriter,
    layers: Iterable[tuple[Path, str | None]],
    *,
    capture: tuple[str, ...] = (),
    captured: dict[str, bytes] | None = None,
) -> Dir:
    """The merged tree of `layers` (lowest first; each a layer blob and its DiffID or None).
    The contents of the regular files at the `capture` paths (e.g. "etc/passwd") that end up in
    the tree are also put into `captured`."""
    state = _State(root=_Implicit(mode=0o755), capture=capture)
    if captured is not None:
        state.captured = captured
    ordered = list(layers)
    for index in range(len(ordered) - 1, -1, -1):
        path, diff_id = ordered[index]
        _flatten_layer(writer, state, Path(path), diff_id, index)
    if state.links:
        target = next(iter(state.links))
        raise LayerError(f"hard link to {target!r}: no layer has that file")
    for parent, name, link, key in state.relinks:
        _relink(state.root, parent, name, link, key)
    return _finalise(state.root)


def _relink(root: Dir, parent: Dir, name: str, link: Symlink, key: str) -> None:
    """A lower layer's symlink (e.g. merged-usr's /lib -> usr/lib) where upper layers put files
    under the same path: applied bottom-up, those files went through the symlink (layers.py
    resolves parents inside the root), so they move to its target and the symlink comes back."""
    here = parent.entries.get(name)
    if not isinstance(here, Dir):
        return
    target = link.target if isinstance(link.target, str) else link.target.decode("utf-8", "surrogateescape")
    start = [] if target.startswith("/") else key.split("/")[:-1]
    dest = _resolve_dir(root, "/".join(start + [target]), 0)
    if dest is None or dest is here:
        return  # a target that isn't a folder: the files stay in a folder at this path
    _merge(here, dest)
    parent.entries[name] = link


def _resolve_dir(root: Dir, path: str, depth: int) -> Dir | None:
    """The folder at `path` inside the tree, symlinks followed inside the root; made if missing."""
    if depth > 40:
        return None
    node, walked = root, []
    for comp in clean_name("/" + path, "symlink target"):
        child = node.entries.get(comp)
        if child is None:
            child = node.entries[comp] = Dir(mode=0o755)
        if isinstance(child, Symlink):
            target = (
                child.target
                if isinstance(child.target, str)
                else child.target.decode("utf-8", "surrogateescape")
            )
            base = "" if target.startswith("/") else "/".join(walked)
            resolved = _resolve_dir(root, f"{base}/{target}", depth + 1)
            if resolved is None:
                return None
            child = resolved
        if not isinstance(child, Dir):
            return None
        node = child
        walked.append(comp)
    return node


def _merge(upper: Dir, lower: Dir) -> None:
    """Moves upper's entries into lower; upper's win, folders merge."""
    for name, node in upper.entries.items():
        old = lower.entries.get(name)
        if isinstance(node, Dir) and isinstance(old, Dir):
            _merge(node, old)
            if not isinstance(node, _Implicit):
                old.mode, old.uid, old.gid = node.mode, node.uid, node.gid
                old.mtime, old.xattrs = node.mtime, node.xattrs
        else:
            lower.entries[name] = node


def _finalise(root: Dir) -> Dir:
    """Implicit folders become plain folders (the writer wants only its own node types)."""
    if isinstance(root, _Implicit):
        root = Dir(
            mode=root.mode,
            uid=root.uid,
            gid=root.gid,
            mtime=root.mtime,
            xattrs=root.xattrs,
            entries=root.entries,
        )
    for name, node in list(root.entries.items()):
        if isinstance(node, Dir):
            root.entries[name] = _finalise(node)
    return root


def _flatten_layer(
    writer: SquashfsWriter, state: _State, path: Path, diff_id: str | None, index: int
) -> None:
    name = f"layer {path.name[:19]}"
    layer = _Layer(index)
    with open(path, "rb", buffering=0) as raw:
        data = LayerStream(raw, name)
        try:
            try:
                with tarfile.open(fileobj=data, mode="r|", errorlevel=1) as tar:
                    for m in tar:
                        state.entries += 1
                        _entry(writer, state, tar, m, layer)
                data.drain()
            except (zlib.error, EOFError, tarfile.TarError) as e:
                raise LayerError(f"{name}: bad layer data ({e})") from None
            except Exception as e:
                if type(e).__module__.startswith("zstd"):
                    raise LayerError(f"{name}: bad compressed data ({e})") from None
                raise
            got = data.hexdigest()
        finally:
            data.close()
    if diff_id is not None and got != diff_id:
        raise IntegrityError(f"{name}: DiffID is {got}, the image config says {diff_id}")
    if layer.late:
        _read_late(writer, path, name, layer)
    state.provided |= layer.provided
    state.cut |= layer.cut


def _read_late(writer: SquashfsWriter, path: Path, name: str, layer: _Layer) -> None:
    """Reads the layer again for the files that only hard links of this layer still show."""
    with open(path, "rb", buffering=0) as raw:
        data = LayerStream(raw, name)
        try:
            with tarfile.open(fileobj=data, mode="r|", errorlevel=1) as tar:
                for m in tar:
                    key = "/".join(clean_name(m.name))
                    links = layer.late.get(key)
                    if links is None or not m.isreg():
                        continue
                    node = _node(writer, tar, m, None, key)
                    for link in links:
                        link.parent.entries[link.name] = node
            data.drain()
        finally:
            data.close()


def _hidden(state: _State, parts: list[str]) -> bool:
    """Whether upper layers hide this path of a lower layer."""
    if "/".join(parts) in state.provided:
        return True
    return any("/".join(parts[:i]) in state.cut for i in range(len(parts)))


def _entry(
    writer: SquashfsWriter, state: _State, tar: tarfile.TarFile, m: tarfile.TarInfo, layer: _Layer
) -> None:
    provided, cut, seen = layer.provided, layer.cut, layer.seen
    parts = clean_name(m.name)
    key = "/".join(parts)
    base = parts[-1] if parts else ""
    if base.startswith(WHITEOUT_PREFIX):
        dir_key = "/".join(parts[:-1])
        if base == OPAQUE:
            cut.add(dir_key)
            return
        victim = base[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", "..") or victim.startswith(WHITEOUT_PREFIX + ".wh."):
            raise LayerError(f"entry {m.name!r}: invalid whiteout")
        target = f"{dir_key}/{victim}" if dir_key else victim
        provided.add(target)
        cut.add(target)
        return

    if not parts:  # the root folder itself
        if not m.isdir():
            raise LayerError(f"entry {m.name!r}: a {m.type!r} entry can't replace the root folder")
        if "" not in state.provided:
            _set_attrs(state.root, m)
            provided.add("")
        return

    waiting = state.links.pop(key, None)
    hidden = _hidden(state, parts)
    if hidden and waiting is None:
        if m.isreg():
            layer.skipped.add(key)
        return  # the streaming tar reader skips the unread data by itself
    node = _node(writer, tar, m, state if key in state.capture and not hidden else None, key)
    if waiting is not None:
        if node is None:  # a link to a link: wait for the final target
            state.links.setdefault(_link_target(m), []).extend(waiting)
        elif isinstance(node, Dir):
            raise LayerError(f"hard link to {key!r}: that is a folder")
        else:
            for link in waiting:
                link.parent.entries[link.name] = node
    if hidden:
        return
    parent = _parent(state.root, parts)
    if parent is None:  # an ancestor is a non-folder of this same layer
        return
    old = parent.entries.get(base)
    if isinstance(old, _Implicit) and not isinstance(node, Dir) and key not in provided:
        if isinstance(node, Symlink):  # upper layers wrote through this symlink: see _relink
            state.relinks.append((parent, base, node, key))
            provided.add(key)
            cut.add(key)
        return  # else upper layers put files inside this path: it stays a folder
    provided.add(key)
    if not isinstance(node, Dir):
        cut.add(key)
    if node is None:  # a hard link, resolved when its target is met
        target = _link_target(m)
        if target in layer.skipped:  # an upper layer replaced the target but not this link:
            parent.entries[base] = Node()  # its content went by unread; a second pass reads it
            layer.late.setdefault(target, []).append(_Link(parent, base, layer.index))
        elif target in seen:
            if isinstance(seen[target], Dir):
                raise LayerError(f"entry {m.name!r}: hard link to a folder")
            parent.entries[base] = seen[target]
            seen[key] = seen[target]
        else:
            parent.entries[base] = Node()  # placeholder until the target is met
            state.links.setdefault(target, []).append(_Link(parent, base, layer.index))
        return
    if isinstance(node, Dir) and isinstance(old, Dir):
        _set_attrs(old, m)  # a folder over a folder: contents merge, the later attributes win
        if isinstance(old, _Implicit):
            old = Dir(
                mode=old.mode,
                uid=old.uid,
                gid=old.gid,
                mtime=old.mtime,
                xattrs=old.xattrs,
                entries=old.entries,
            )
            parent.entries[base] = old
        seen[key] = old
        return
    seen[key] = node
    parent.entries[base] = node


def _link_target(m: tarfile.TarInfo) -> str:
    target = "/".join(clean_name(m.linkname, "hard link target"))
    if not target:
        raise LayerError(f"entry {m.name!r}: hard link to the root folder")
    return target


def _parent(root: Dir, parts: list[str]) -> Dir | None:
    node = root
    for comp in parts[:-1]:
        child = node.entries.get(comp)
        if child is None:
            child = _Implicit(mode=0o755)
            node.entries[comp] = child
        if not isinstance(child, Dir):
            return None
        node = child
    return node


def _node(
    writer: SquashfsWriter, tar: tarfile.TarFile, m: tarfile.TarInfo, keep: _State | None, key: str
) -> Node | None:
    """The squashfs node for a tar entry; None for a hard link (resolved later)."""
    if m.islnk():
        return None
    if m.isreg():
        f = tar.extractfile(m)
        if f is None:
            raise LayerError(f"entry {m.name!r}: no data")
        if keep is not None:
            data = f.read(m.size)
            keep.captured[key] = data
            f = io.BytesIO(data)
        node: Node = File(data=writer.add_data(f, m.size))
    elif m.isdir():
        node = Dir()
    elif m.issym():
        node = Symlink(target=m.linkname)
    elif m.ischr() or m.isblk():
        node = Device(kind="c" if m.ischr() else "b", major=m.devmajor, minor=m.devminor)
    elif m.isfifo():
        node = Fifo()
    else:
        raise LayerError(f"entry {m.name!r}: unsupported tar entry type {m.type!r}")
    _set_attrs(node, m)
    return node


def _set_attrs(node: Node, m: tarfile.TarInfo) -> None:
    node.mode = stat.S_IMODE(m.mode)
    node.uid = m.uid
    node.gid = m.gid
    node.mtime = max(0, int(m.mtime))
    node.xattrs = _xattrs(m)


def _xattrs(m: tarfile.TarInfo) -> dict[str | bytes, bytes]:
    """The entry's xattrs in the namespaces squashfs stores (user., trusted., security.)."""
    return {name: data for name, data in tar_xattrs(m) if name.startswith(("user.", "trusted.", "security."))}
