"""The image model: descriptors, manifests, indexes, configs, platforms.

Plain dataclasses over the OCI image-spec JSON (Docker schema2 types map onto the same shapes).
Parsing checks the structure ocibox relies on and raises IntegrityError on anything malformed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from ocibox.errors import IntegrityError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
SCHEMA1_TYPES = (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED)

REF_NAME = "org.opencontainers.image.ref.name"

_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex part of `sha256:<hex>`."""
    return digest.partition(":")[2]


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, or just `arch` (os linux), as `--platform` takes it."""
        parts = text.strip().split("/")
        if len(parts) == 1 and parts[0]:
            parts = ["linux", parts[0]]
        if len(parts) not in (2, 3) or not all(parts):
            raise IntegrityError(f"invalid platform {text!r}: expected os/arch[/variant]")
        arch = _GO_ARCH.get(parts[1].lower(), parts[1].lower())
        variant = parts[2].lower() if len(parts) == 3 else None
        return cls(parts[0].lower(), arch, _normal_variant(arch, variant))

    @classmethod
    def host(cls) -> Platform:
        machine = os.uname().machine if hasattr(os, "uname") else _platform.machine()
        arch = _GO_ARCH.get(machine, machine)
        variant = "v7" if machine == "armv7l" else "v6" if machine == "armv6l" else None
        return cls("linux", arch, _normal_variant(arch, variant))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Platform:
        return cls(
            str(data.get("os", "")),
            str(data.get("architecture", "")),
            data.get("variant") or None,
            data.get("os.version") or None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        if self.os_version:
            out["os.version"] = self.os_version
        return out

    def matches(self, other: Platform) -> bool:
        """True when an image made for `other` runs on this (wanted) platform.

        arm64 images without a variant are v8; an arm wanted as v7 also takes v6 and v5, as
        containerd's matcher does.
        """
        if self.os != other.os or self.architecture != other.architecture:
            return False
        mine = _normal_variant(self.architecture, self.variant)
        theirs = _normal_variant(other.architecture, other.variant)
        if mine is None or mine == theirs:
            return True
        if self.architecture == "arm" and mine and theirs:
            return theirs <= mine
        return False

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _normal_variant(arch: str, variant: str | None) -> str | None:
    if arch == "arm64" and variant in (None, "v8", "8"):
        return "v8"
    if variant and variant.isdigit():
        return "v" + variant
    return variant


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: Platform | None = None
    urls: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, data: Any) -> Descriptor:
        if not isinstance(data, dict):
            raise IntegrityError("malformed descriptor: not an object")
        try:
            media_type = str(data["mediaType"])
            digest = str(data["digest"])
            size = int(data["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed descriptor: missing or bad {exc}") from None
        _check_digest(digest)
        if size < 0:
            raise IntegrityError(f"malformed descriptor {digest}: negative size")
        plat = data.get("platform")
        urls = data.get("urls")
        annotations = data.get("annotations")
        if annotations and not _is_str_map(annotations):
            raise IntegrityError(f"malformed descriptor {digest}: annotations must map strings to strings")
        if urls and not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
            raise IntegrityError(f"malformed descriptor {digest}: urls must be a list of strings")
        return cls(
            media_type,
            digest,
            size,
            dict(annotations) if annotations else None,
            Platform.from_json(plat) if isinstance(plat, dict) else None,
            tuple(urls) if urls else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = self.platform.to_json()
        return out

    def with_annotations(self, annotations: dict[str, str] | None) -> Descriptor:
        return Descriptor(
            self.media_type, self.digest, self.size, annotations or None, self.platform, self.urls
        )


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _check_digest(digest: str) -> None:
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise IntegrityError(f"unsupported or malformed digest {digest!r}")


@dataclass
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)


@dataclass
class Index:
    media_type: str
    manifests: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    def platforms(self) -> list[Platform]:
        return [d.platform for d in self.manifests if d.platform and d.media_type in MANIFEST_TYPES]

    def select(self, wanted: Platform) -> Descriptor:
        """The manifest for `wanted`; exact variant first, then a compatible one."""
        candidates = [
            d for d in self.manifests if d.platform and d.media_type in MANIFEST_TYPES + INDEX_TYPES
        ]
        for d in candidates:
            if d.platform == wanted or (
                d.platform.os == wanted.os
                and d.platform.architecture == wanted.architecture
                and _normal_variant(d.platform.architecture, d.platform.variant)
                == _normal_variant(wanted.architecture, wanted.variant)
            ):
                return d
        for d in candidates:
            if wanted.matches(d.platform):
                return d
        available = ", ".join(str(p) for p in self.platforms()) or "none"
        raise IntegrityError(f"no image for platform {wanted} (available: {available})")


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or index; the mediaType field wins over the transport's header."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"malformed manifest: {exc}") from None
    if not isinstance(doc, dict):
        raise IntegrityError("malformed manifest: not a JSON object")
    kind = doc.get("mediaType") or media_type
    if doc.get("schemaVersion") == 1 or kind in SCHEMA1_TYPES:
        raise IntegrityError(
            "Docker schema 1 manifests are not supported (deprecated since 2017): "
            "ask the image's publisher for a schema 2 or OCI image"
        )
    if kind is None:
        kind = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    annotations = dict(doc.get("annotations") or {})
    if kind in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise IntegrityError("malformed index: no manifests list")
        return Index(kind, [Descriptor.from_json(m) for m in manifests], annotations, data)
    layers = doc.get("layers")
    if "config" not in doc or not isinstance(layers, list):
        raise IntegrityError(f"malformed manifest of type {kind}: needs config and layers")
    return Manifest(
        kind,
        Descriptor.from_json(doc["config"]),
        [Descriptor.from_json(layer) for layer in layers],
        annotations,
        data,
    )


@dataclass
class ImageConfig:
    """The image configuration blob; `raw` is the whole document, the properties its common parts."""

    raw: dict[str, Any]

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"malformed image config: {exc}") from None
        if not isinstance(doc, dict):
            raise IntegrityError("malformed image config: not a JSON object")
        rootfs = doc.get("rootfs")
        if rootfs is not None and not isinstance(rootfs, dict):
            raise IntegrityError("malformed image config: bad rootfs")
        _check_config_types(doc)
        return cls(doc)

    @property
    def _config(self) -> dict[str, Any]:
        return self.raw.get("config") or {}

    @property
    def diff_ids(self) -> list[str]:
        return list((self.raw.get("rootfs") or {}).get("diff_ids") or [])

    @property
    def entrypoint(self) -> list[str]:
        return list(self._config.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self._config.get("Cmd") or [])

    @property
    def env(self) -> list[str]:
        return list(self._config.get("Env") or [])

    @property
    def working_dir(self) -> str:
        return self._config.get("WorkingDir") or ""

    @property
    def user(self) -> str:
        return self._config.get("User") or ""

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._config.get("Labels") or {})

    @property
    def exposed_ports(self) -> list[str]:
        return sorted(self._config.get("ExposedPorts") or {})

    @property
    def volumes(self) -> list[str]:
        return sorted(self._config.get("Volumes") or {})

    @property
    def stop_signal(self) -> str:
        return self._config.get("StopSignal") or ""

    @property
    def created(self) -> str:
        return self.raw.get("created") or ""

    @property
    def platform(self) -> Platform:
        return Platform(
            self.raw.get("os", "linux"), self.raw.get("architecture", ""), self.raw.get("variant") or None
        )


# The fields of an image config that ocibox reads, and the JSON type each must have (null is
# always allowed): a config from a store or an archive is checked once, here, so that no later
# stage meets a number where it expects a list of strings.
_STR_LIST = "list of strings"
_STR_MAP = "object of strings"
_OBJECT = "object"
_STRING = "string"
_CONFIG_FIELDS = {
    "Env": _STR_LIST,
    "Entrypoint": _STR_LIST,
    "Cmd": _STR_LIST,
    "User": _STRING,
    "WorkingDir": _STRING,
    "StopSignal": _STRING,
    "Labels": _STR_MAP,
    "Volumes": _OBJECT,
    "ExposedPorts": _OBJECT,
}
_TOP_FIELDS = {"os": _STRING, "architecture": _STRING, "variant": _STRING, "created": _STRING}


def _has_type(value: Any, kind: str) -> bool:
    if kind == _STR_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == _STR_MAP:
        return _is_str_map(value)
    if kind == _OBJECT:
        return isinstance(value, dict)
    return isinstance(value, str)


def _check_config_types(doc: dict[str, Any]) -> None:
    def check(fields: dict[str, str], where: dict[str, Any], prefix: str) -> None:
        for key, kind in fields.items():
            value = where.get(key)
            if value is not None and not _has_type(value, kind):
                raise IntegrityError(f"malformed image config: {prefix}{key} must be a {kind}")

    check(_TOP_FIELDS, doc, "")
    config = doc.get("config")
    if config is not None and not isinstance(config, dict):
        raise IntegrityError("malformed image config: config must be an object")
    for key in ("Entrypoint", "Cmd"):  # Docker's strslice: a lone string means one argument
        if isinstance((config or {}).get(key), str):
            config[key] = [config[key]]
    check(_CONFIG_FIELDS, config or {}, "config.")
    diff_ids = (doc.get("rootfs") or {}).get("diff_ids")
    if diff_ids is not None and not _has_type(diff_ids, _STR_LIST):
        raise IntegrityError("malformed image config: rootfs.diff_ids must be a list of strings")


@dataclass
class Image:
    """One platform's image as stored: its name, manifest and config."""

    name: str
    manifest_digest: str
    manifest: Manifest
    config: ImageConfig

    @property
    def id(self) -> str:
        """Docker's image ID: the config digest."""
        return self.manifest.config.digest

    @property
    def size(self) -> int:
        return self.manifest.config.size + sum(layer.size for layer in self.manifest.layers)

    @property
    def chain_id(self) -> str:
        ids = chain_ids(self.config.diff_ids)
        return ids[-1] if ids else sha256_digest(b"")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out
