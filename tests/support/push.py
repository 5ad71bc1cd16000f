"""Push an OCI layout to a registry exactly as it is, blob for blob.

skopeo always compresses layers on the way to a registry, so the image with uncompressed layers
is pushed with this plain distribution-spec client: monolithic blob uploads, then manifests.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from .layout import DOCKER_LIST, OCI_INDEX


def _upload_blob(registry, repository: str, digest: str, data: bytes) -> None:
    status, _, _ = registry.request(f"/v2/{repository}/blobs/{digest}", method="HEAD")
    if status == 200:
        return
    status, headers, body = registry.request(f"/v2/{repository}/blobs/uploads/", method="POST", data=b"")
    if status != 202:
        raise RuntimeError(f"upload start for {repository} failed: {status} {body[:200]!r}")
    location = headers["Location"]
    parsed = urllib.parse.urlsplit(location)
    query = parsed.query + ("&" if parsed.query else "") + "digest=" + urllib.parse.quote(digest)
    path = parsed.path + "?" + query
    status, _, body = registry.request(
        path,
        method="PUT",
        data=data,
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    )
    if status != 201:
        raise RuntimeError(f"upload of {digest} to {repository} failed: {status} {body[:200]!r}")


def _push_manifest(registry, layout: Path, repository: str, desc: dict, reference: str) -> None:
    data = _blob(layout, desc["digest"])
    doc = json.loads(data)
    media_type = doc.get("mediaType", desc["mediaType"])
    if media_type in (OCI_INDEX, DOCKER_LIST):
        for child in doc["manifests"]:
            _push_manifest(registry, layout, repository, child, child["digest"])
    else:
        for blob in [doc["config"], *doc["layers"]]:
            _upload_blob(registry, repository, blob["digest"], _blob(layout, blob["digest"]))
    status, _, body = registry.request(
        f"/v2/{repository}/manifests/{reference}",
        method="PUT",
        data=data,
        headers={"Content-Type": media_type},
    )
    if status != 201:
        raise RuntimeError(f"manifest push {repository}:{reference} failed: {status} {body[:300]!r}")


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def push_layout(registry, layout: Path, ref_name: str, repository: str, tag: str) -> str:
    """Push the image tagged `ref_name` in `layout` to `registry` as `repository:tag`; its digest."""
    index = json.loads((Path(layout) / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref_name:
            _push_manifest(registry, Path(layout), repository, desc, tag)
            return desc["digest"]
    raise KeyError(f"{ref_name} not in {layout}")
