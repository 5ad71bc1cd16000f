"""The test images: what each one is, how it reaches a registry, and what the registry then holds.

`TestImages(registry, layouts_dir)` is the `images` fixture: a mapping from a name to a
`TestImage`, pushed the first time a test asks for it (so a test that only needs busybox never
waits for the Debian build). Names:

    busybox                OCI manifest, 2 gzip layers, linux/amd64
    busybox-v2s2           the same as Docker schema2 (skopeo --format v2s2)
    busybox-zstd           OCI, zstd layers
    busybox-uncompressed   OCI, plain tar layers (pushed by tests/support/push.py: skopeo compresses)
    multiarch              OCI index: linux/amd64 + linux/arm64/v8 busybox
    multiarch-v2s2         the same as a Docker manifest list
    debian                 Debian bookworm minbase + a layer of whiteouts (slow, cached)
    python                 debian + python3 + python3-pip/venv/yaml/requests/jinja2 (slow, cached)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import busybox, debian
from .layout import DOCKER_LIST, OCI_INDEX
from .push import push_layout
from .registry import MANIFEST_TYPES


@dataclass
class LayerInfo:
    digest: str
    size: int
    media_type: str
    diff_id: str


@dataclass
class ManifestInfo:
    """One image manifest as the registry serves it."""

    digest: str
    media_type: str
    size: int
    platform: str  # "linux/amd64", "linux/arm64/v8"
    config_digest: str
    config: dict
    layers: list[LayerInfo]
    raw: bytes = b""

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass
class TestImage:
    """An image in a test registry. `str(image)` is its reference, e.g. "127.0.0.1:41234/busybox:latest".

    `digest` is the digest of what the tag points to (a manifest, or an index / manifest list);
    `manifests` maps each platform to its manifest; single-platform images also answer `.layers`,
    `.config`, `.config_digest` and `.manifest` directly. `facts` holds what the build knows
    (for debian/python: unpacked size, file count, deleted paths …).
    """

    __test__ = False  # not a pytest test class

    name: str
    host: str
    repository: str
    tag: str
    digest: str
    media_type: str
    manifests: dict[str, ManifestInfo]
    raw: bytes = b""
    facts: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.ref

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"

    @property
    def ref_by_digest(self) -> str:
        return f"{self.host}/{self.repository}@{self.digest}"

    @property
    def is_index(self) -> bool:
        return self.media_type in (OCI_INDEX, DOCKER_LIST)

    @property
    def platforms(self) -> list[str]:
        return list(self.manifests)

    @property
    def manifest(self) -> ManifestInfo:
        if len(self.manifests) != 1:
            raise AttributeError(f"{self.name} has several platforms: use .manifests[platform]")
        return next(iter(self.manifests.values()))

    @property
    def layers(self) -> list[LayerInfo]:
        return self.manifest.layers

    @property
    def config(self) -> dict:
        return self.manifest.config

    @property
    def config_digest(self) -> str:
        return self.manifest.config_digest


def platform_string(platform: dict) -> str:
    parts = [platform.get("os", ""), platform.get("architecture", "")]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(parts)


def fetch(registry, repository: str, reference: str, kind: str = "manifests") -> tuple[bytes, str]:
    status, headers, body = registry.request(
        f"/v2/{repository}/{kind}/{reference}", headers={"Accept": MANIFEST_TYPES}
    )
    if status != 200:
        raise RuntimeError(f"GET {repository} {kind}/{reference}: {status} {body[:200]!r}")
    return body, headers.get("Content-Type", "")


def describe(
    registry, name: str, repository: str, tag: str = "latest", facts: dict | None = None
) -> TestImage:
    """Read back what `repository:tag` is on `registry`: digests, media types, configs, layers."""
    raw, content_type = fetch(registry, repository, tag)
    doc = json.loads(raw)
    media_type = doc.get("mediaType", content_type)
    manifests: dict[str, ManifestInfo] = {}
    if media_type in (OCI_INDEX, DOCKER_LIST):
        for child in doc["manifests"]:
            child_raw, _ = fetch(registry, repository, child["digest"])
            info = _manifest_info(registry, repository, child_raw, child["mediaType"])
            info.platform = platform_string(child["platform"])
            manifests[info.platform] = info
    else:
        info = _manifest_info(registry, repository, raw, media_type)
        manifests[info.platform] = info
    return TestImage(
        name=name,
        host=registry.host,
        repository=repository,
        tag=tag,
        digest="sha256:" + hashlib.sha256(raw).hexdigest(),
        media_type=media_type,
        manifests=manifests,
        raw=raw,
        facts=dict(facts or {}),
    )


def _manifest_info(registry, repository: str, raw: bytes, media_type: str) -> ManifestInfo:
    doc = json.loads(raw)
    config_raw, _ = fetch(registry, repository, doc["config"]["digest"], kind="blobs")
    config = json.loads(config_raw)
    diff_ids = config["rootfs"]["diff_ids"]
    layers = [
        LayerInfo(layer["digest"], layer["size"], layer["mediaType"], diff_id)
        for layer, diff_id in zip(doc["layers"], diff_ids, strict=True)
    ]
    return ManifestInfo(
        digest="sha256:" + hashlib.sha256(raw).hexdigest(),
        media_type=doc.get("mediaType", media_type),
        size=len(raw),
        platform=platform_string(config),
        config_digest=doc["config"]["digest"],
        config=config,
        layers=layers,
        raw=raw,
    )


def skopeo_copy(source: str, registry, destination: str, *args: str) -> None:
    """`skopeo copy` into `registry` (plain HTTP, with its credentials if any)."""
    cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false", *args]
    if registry.creds:
        cmd += ["--dest-creds", registry.creds]
    cmd += [source, f"docker://{registry.host}/{destination}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")


# name -> (layout, ref name in the layout, extra skopeo flags, or None to push with push.py)
BUSYBOX_RECIPES: dict[str, tuple[str, list[str] | None]] = {
    "busybox": ("busybox", ["--preserve-digests"]),
    "busybox-v2s2": ("busybox", ["--format", "v2s2"]),
    "busybox-zstd": ("busybox-zstd", ["--preserve-digests"]),
    "busybox-uncompressed": ("busybox-uncompressed", None),
    "multiarch": ("multiarch", ["--all", "--preserve-digests"]),
    "multiarch-v2s2": ("multiarch", ["--all", "--format", "v2s2"]),
}
SLOW = ("debian", "python")
NAMES = (*BUSYBOX_RECIPES, *SLOW)


def push_busybox(layouts: dict[str, Path], registry, name: str, repository: str, tag: str = "latest") -> None:
    """Push the busybox-family image `name` to `registry` as `repository:tag`."""
    layout_name, flags = BUSYBOX_RECIPES[name]
    layout = layouts[layout_name]
    if flags is None:
        push_layout(registry, layout, "latest", repository, tag)
    else:
        skopeo_copy(f"oci:{layout}:latest", registry, f"{repository}:{tag}", *flags)


class TestImages:
    """The `images` fixture: name -> TestImage on `registry`, each pushed on first use."""

    __test__ = False

    def __init__(self, registry, workdir: Path, layouts: dict[str, Path] | None = None):
        self.registry = registry
        self.workdir = Path(workdir)
        self._layouts = layouts
        self._images: dict[str, TestImage] = {}
        self._lock = threading.RLock()

    @property
    def layouts(self) -> dict[str, Path]:
        """The busybox OCI layouts (built once per session, in a second)."""
        with self._lock:
            if self._layouts is None:
                self._layouts = busybox.build_busybox_layouts(self.workdir / "layouts")
            return self._layouts

    def __contains__(self, name: str) -> bool:
        return name in NAMES

    def __iter__(self):
        return iter(NAMES)

    def __len__(self) -> int:
        return len(NAMES)

    def keys(self):
        return list(NAMES)

    def __getitem__(self, name: str) -> TestImage:
        if name not in NAMES:
            raise KeyError(f"no test image {name!r}; known: {', '.join(NAMES)}")
        with self._lock:
            if name not in self._images:
                self._images[name] = self._publish(name)
            return self._images[name]

    def _publish(self, name: str) -> TestImage:
        if name in BUSYBOX_RECIPES:
            push_busybox(self.layouts, self.registry, name, name)
            return describe(self.registry, name, name)
        built = debian.cached_layout()
        skopeo_copy(f"oci:{built.path}:{name}", self.registry, f"{name}:latest", "--preserve-digests")
        return describe(self.registry, name, name, facts=built.facts[name])
