"""The store is an OCI image layout that other tools read, and it never holds a half-written blob."""

import hashlib
import json
import multiprocessing
import os
import subprocess

import pytest

from ocibox.errors import IntegrityError, NotFound
from ocibox.image import OCI_MANIFEST, Descriptor, sha256_digest
from ocibox.store import Store


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_new_store_is_an_oci_image_layout(tmp_path):
    store = Store(tmp_path / "s").ensure()
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((store.root / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["manifests"] == []


def test_a_blob_is_visible_only_once_its_digest_is_verified(tmp_path):
    store = Store(tmp_path / "s")
    data = b"hello layers" * 1000
    digest = _digest(data)
    with (
        pytest.raises(IntegrityError, match="does not match its digest"),
        store.blob_writer(digest, len(data)) as w,
    ):
        w.write(data[:-1] + b"X")
    assert not store.has_blob(digest)
    assert list(store.tmp_dir.iterdir()) == [], "the temp file is removed"
    with pytest.raises(IntegrityError, match="expected"), store.blob_writer(digest, len(data)) as w:
        w.write(data[:100])
    assert not store.has_blob(digest)
    with store.blob_writer(digest, len(data)) as w:
        w.write(data[:10])
        w.reset()
        w.write(data)
    assert store.read_blob(digest) == data
    assert store.write_blob(data) == digest


def test_an_error_inside_a_write_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path / "s")
    data = b"x" * 4096
    with pytest.raises(RuntimeError), store.blob_writer(_digest(data), len(data)) as w:
        w.write(data[:1000])
        raise RuntimeError("network cut")
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []


def _write_same_blob(root: str, data: bytes, barrier) -> None:
    store = Store(root)
    digest = _digest(data)
    barrier.wait()
    with store.blob_lock(digest):
        if not store.has_blob(digest):
            with store.blob_writer(digest, len(data)) as w:
                for i in range(0, len(data), 65536):
                    w.write(data[i : i + 65536])


def test_two_processes_writing_the_same_blob_both_succeed_and_store_it_once(tmp_path):
    data = os.urandom(4 << 20)
    root = str(tmp_path / "s")
    Store(root).ensure()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_write_same_blob, args=(root, data, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = Store(root)
    assert [p.name for p in store.blobs_dir.iterdir()] == [_digest(data).split(":")[1]]
    assert store.read_blob(_digest(data)) == data
    assert [p for p in store.tmp_dir.iterdir() if not p.name.endswith(".lock")] == []


def _image(store: Store, layer: bytes, config: dict | None = None) -> Descriptor:
    layer_digest = store.write_blob(layer)
    config_raw = json.dumps(
        config
        or {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
    ).encode()
    config_digest = store.write_blob(config_raw)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config_raw),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    return Descriptor(OCI_MANIFEST, store.write_blob(manifest), len(manifest))


def test_tags_name_images_and_gc_keeps_only_what_they_need(tmp_path):
    store = Store(tmp_path / "s")
    a = _image(store, b"layer a" * 100)
    b = _image(store, b"layer b" * 100)
    store.tag("localhost/a:1", a)
    store.tag("localhost/b:1", b)
    store.tag("localhost/b:1", b)  # tagging twice keeps one entry
    assert [t.name for t in store.tagged()] == ["localhost/a:1", "localhost/b:1"]
    assert store.load_image("localhost/a:1").manifest_digest == a.digest
    assert store.load_image(a.digest).name == "localhost/a:1"
    assert store.gc() == (0, 0)
    store.untag("localhost/b:1")
    removed, freed = store.gc()
    assert removed == 3 and freed > 700
    assert store.load_image("localhost/a:1")
    with pytest.raises(NotFound, match="not in the store"):
        store.load_image("localhost/b:1")
    with pytest.raises(NotFound):
        store.untag("localhost/b:1")


def test_skopeo_reads_the_store(tmp_path):
    store = Store(tmp_path / "s")
    store.tag("localhost/a:1", _image(store, b"layer a" * 100))
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{store.root}:localhost/a:1"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mediaType"] == OCI_MANIFEST


def test_a_malformed_digest_is_refused(tmp_path):
    store = Store(tmp_path / "s")
    for bad in ["sha256:abc", "md5:" + "a" * 32, "sha256:" + "G" * 64, "sha256:../../etc/passwd"]:
        with pytest.raises(IntegrityError):
            store.blob_path(bad)
    assert sha256_digest(b"") == _digest(b"")
