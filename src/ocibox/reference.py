"""Image references, parsed and normalised exactly as Docker does.

`alpine` → `docker.io/library/alpine:latest`; `host:5000/a/b:tag`; `name@sha256:…`.
The grammar is the one of the distribution project's reference package:

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [domain "/"] component ("/" component)*
    domain     := host [":" port]   (a first component with "." or ":", or "localhost")
    component  := [a-z0-9]+ ((\\.|_|__|-+) [a-z0-9]+)*
    tag        := [\\w][\\w.-]{0,127}
    digest     := algorithm ":" hex   (sha256: 64 lowercase hex digits)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ocibox.errors import InvalidReference

DEFAULT_REGISTRY = "docker.io"
LEGACY_REGISTRY = "index.docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
OFFICIAL_PREFIX = "library"
DEFAULT_TAG = "latest"
NAME_MAX = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE = re.compile(
    rf"(?P<name>(?:(?P<domain>{_DOMAIN})/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)
_DOMAIN_RE = re.compile(_DOMAIN)
_HEX64 = re.compile(r"[a-f0-9]{64}")
_KNOWN_DIGESTS = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True)
class Reference:
    """A normalised image reference. `tag` is None only when a digest is given."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`registry/repository`, e.g. `docker.io/library/alpine`."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def identifier(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def familiar(self) -> str:
        """The short form Docker prints: `alpine:latest`, `user/app:1`, `host:5000/x:y`."""
        name = self.name
        if self.registry == DEFAULT_REGISTRY:
            name = self.repository
            if name.startswith(OFFICIAL_PREFIX + "/") and name.count("/") == 1:
                name = name[len(OFFICIAL_PREFIX) + 1 :]
        return name + _suffix(self.tag, self.digest)

    def __str__(self) -> str:
        return self.name + _suffix(self.tag, self.digest)


def _suffix(tag: str | None, digest: str | None) -> str:
    return (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def parse(text: str) -> Reference:
    """Parse and normalise a reference as `docker pull` does; raise InvalidReference."""
    if not text:
        raise InvalidReference("invalid reference format: empty image name")
    if _HEX64.fullmatch(text):
        raise InvalidReference(
            f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings"
        )
    registry, remainder = _split_domain(text)
    repo_part = remainder.split("@", 1)[0].split(":", 1)[0]
    if repo_part.lower() != repo_part:
        raise InvalidReference(f"invalid reference format: repository name must be lowercase: {text!r}")
    match = _REFERENCE.fullmatch(f"{registry}/{remainder}")
    if match is None:
        raise InvalidReference(f"invalid reference format: {text!r}")
    if len(match["name"]) > NAME_MAX:
        raise InvalidReference(f"repository name must not be more than {NAME_MAX} characters: {text!r}")
    digest = match["digest"]
    if digest is not None:
        check_digest(digest)
    tag = match["tag"]
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    repository = match["name"][len(registry) + 1 :]
    return Reference(registry, repository, tag, digest)


def _split_domain(text: str) -> tuple[str, str]:
    first, slash, rest = text.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        registry, remainder = DEFAULT_REGISTRY, text
    else:
        registry, remainder = first, rest
        if not _DOMAIN_RE.fullmatch(registry):
            raise InvalidReference(f"invalid reference format: bad registry host {registry!r}")
    if registry == LEGACY_REGISTRY:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in remainder.split("@", 1)[0]:
        remainder = f"{OFFICIAL_PREFIX}/{remainder}"
    return registry, remainder


def check_digest(digest: str) -> None:
    """Raise InvalidReference unless `digest` is `algorithm:hex` with a known algorithm and length."""
    algorithm, sep, hexpart = digest.partition(":")
    length = _KNOWN_DIGESTS.get(algorithm)
    if not sep or length is None:
        raise InvalidReference(f"invalid digest {digest!r}: unsupported algorithm")
    if len(hexpart) != length or not re.fullmatch(r"[a-f0-9]+", hexpart):
        raise InvalidReference(f"invalid digest {digest!r}: expected {length} lowercase hex digits")
