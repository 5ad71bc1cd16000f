"""Answering a registry's `WWW-Authenticate` challenge: bearer tokens and basic auth.

The flow of the distribution spec's token authentication:
  1. a request comes back 401 with `WWW-Authenticate: Bearer realm="…",service="…",scope="…"`;
  2. ocibox asks the realm for a token for `repository:<name>:pull` (anonymously, or with the user's
     basic credentials, or with an OAuth refresh token when the login stored one);
  3. the token is sent as `Authorization: Bearer …` and reused for that scope until it expires.
A `Basic` challenge is answered with the stored user and password.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ocibox.errors import AuthError, RegistryError
from ocibox.registry.transport import ProtocolError

if TYPE_CHECKING:
    from ocibox.registry.credentials import Credential

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=\s*(?:,|$))")
_SPACE = re.compile(r"[\s,]*")
DEFAULT_TOKEN_LIFETIME = 60  # seconds, as the token spec says when expires_in is absent
EXPIRY_MARGIN = 10  # renew a little before the registry would refuse the token


@dataclass
class Challenge:
    """One authentication challenge: the scheme (lower case) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` header values (RFC 7235): several challenges, quoted values, token68."""
    out: list[Challenge] = []
    for value in headers:
        pos, end = 0, len(value)
        current: Challenge | None = None
        while pos < end:
            pos = _SPACE.match(value, pos).end()
            word = _TOKEN.match(value, pos)
            if word is None:
                break
            after = _skip_blanks(value, word.end())
            if current is not None and after < end and value[after] == "=":
                name = word.group().lower()
                pos = _skip_blanks(value, after + 1)
                param, pos = _param_value(value, pos)
                current.params[name] = param
                continue
            current = Challenge(word.group().lower())
            out.append(current)
            pos = _skip_blanks(value, word.end())
            t68 = _TOKEN68.match(value, pos)
            if t68:
                current.params[""] = t68.group()
                pos = t68.end()
    return out


def _skip_blanks(value: str, pos: int) -> int:
    while pos < len(value) and value[pos] in " \t":
        pos += 1
    return pos


def _param_value(value: str, pos: int) -> tuple[str, int]:
    if pos < len(value) and value[pos] == '"':
        out = []
        pos += 1
        while pos < len(value) and value[pos] != '"':
            if value[pos] == "\\" and pos + 1 < len(value):
                pos += 1
            out.append(value[pos])
            pos += 1
        return "".join(out), pos + 1
    word = _TOKEN.match(value, pos)
    if word is None:
        return "", pos
    return word.group(), word.end()


@dataclass
class Token:
    value: str
    expires: float  # time.monotonic() after which it is not sent any more


class Authenticator:
    """Authorization for one registry host, shared by the threads of one client.

    `credential` is called at most once, and only when the registry asks for authentication, so an
    anonymous pull from an open registry never reads the credential files.
    """

    def __init__(
        self,
        registry: str,
        transport,
        credential: Callable[[], Credential | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self._transport = transport
        self._credential_source = credential
        self._credential: Credential | None = None
        self._credential_loaded = False
        self._clock = clock
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[str, Token] = {}

    @property
    def credential(self) -> Credential | None:
        if not self._credential_loaded:
            self._credential = self._credential_source()
            self._credential_loaded = True
        return self._credential

    def use_credential(self, credential: Credential | None) -> None:
        """Use these credentials instead of the stored ones (`ocibox login`)."""
        self._credential, self._credential_loaded = credential, True

    def authorization(self, scope: str) -> str | None:
        """The Authorization header value to send for `scope`, from what is known so far."""
        with self._lock:
            challenge = self._challenge
            if challenge is None:
                return None
            if challenge.scheme == "basic":
                return self._basic()
            return self._bearer(challenge, scope)

    def learn(self, headers: Iterable[str]) -> None:
        """Remember the scheme a registry asked for (its ping's 401), to authenticate up front."""
        challenge = _preferred(parse_challenges(headers))
        if challenge is not None:
            with self._lock:
                self._challenge = challenge

    def answer(self, headers: Iterable[str], scope: str, sent: str | None) -> str:
        """After a 401: learn the challenge and return a fresh Authorization value to retry with.

        `sent` is what the failed request carried; if it was a current bearer token for this scope
        the registry refused it and the error is the caller's to report.
        """
        challenges = parse_challenges(headers)
        challenge = _preferred(challenges)
        if challenge is None:
            schemes = ", ".join(c.scheme for c in challenges) or "none"
            raise AuthError(f"{self.registry} asks for an unsupported authentication scheme ({schemes})")
        with self._lock:
            self._challenge = challenge
            if challenge.scheme == "basic":
                value = self._basic()
                if value is None:
                    raise AuthError(self.required_message())
                return value
            current = self._tokens.get(scope)
            if current is not None and sent == "Bearer " + current.value:
                del self._tokens[scope]
            return self._bearer(challenge, scope)

    def _bearer(self, challenge: Challenge, scope: str) -> str:
        """A current token for `scope` as a header value: the cached one, or a new one (lock held)."""
        token = self._tokens.get(scope)
        if token is None or token.expires <= self._clock():
            token = self._fetch_token(challenge, scope)
            self._tokens[scope] = token
        return "Bearer " + token.value

    def required_message(self) -> str:
        return f"authentication required by {self.registry}: run 'ocibox login {self.registry}'"

    def _basic(self) -> str | None:
        cred = self.credential
        if cred is None or not cred.username:
            return None
        raw = f"{cred.username}:{cred.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _fetch_token(self, challenge: Challenge, scope: str) -> Token:
        import urllib.parse

        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{self.registry} sent a bearer challenge without a realm")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthError(f"{self.registry} sent a bad token realm {realm!r}")
        if parts.scheme == "http" and not self._transport.allows_plain_http(parts.hostname or ""):
            raise AuthError(f"refusing to fetch a token over plain HTTP from {parts.netloc}")
        query: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        if scope:
            query.append(("scope", scope))
        cred = self.credential
        headers = {"Accept": "application/json"}
        if cred is not None and cred.identity_token:
            form = query + [
                ("grant_type", "refresh_token"),
                ("refresh_token", cred.identity_token),
                ("client_id", "ocibox"),
            ]
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            body = urllib.parse.urlencode(form).encode()
            response = self._transport.request("POST", realm, headers, body)
        else:
            if cred is not None and cred.username:
                headers["Authorization"] = self._basic() or ""
                query.append(("account", cred.username))
            sep = "&" if parts.query else "?"
            url = realm + (sep + urllib.parse.urlencode(query) if query else "")
            response = self._transport.request("GET", url, headers)
        with response:
            data = response.read_all(1 << 20)
        if response.status in (401, 403):
            if cred is not None:
                raise AuthError(f"login to {self.registry} failed: incorrect username or password")
            raise AuthError(self.required_message())
        if response.status == 429 or response.status >= 500:  # retried like any busy server
            raise ProtocolError(f"token server {parts.netloc} answered {response.status} {response.reason}")
        if response.status != 200:
            raise RegistryError(f"token server {parts.netloc} answered {response.status} {response.reason}")
        try:
            doc = json.loads(data)
            value = doc.get("token") or doc.get("access_token")
            lifetime = int(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"token server {parts.netloc} sent a malformed answer") from None
        if not value or not isinstance(value, str):
            raise RegistryError(f"token server {parts.netloc} sent no token")
        lifetime = max(lifetime, DEFAULT_TOKEN_LIFETIME)
        return Token(value, self._clock() + lifetime - EXPIRY_MARGIN)


def _preferred(challenges: list[Challenge]) -> Challenge | None:
    by_scheme = {c.scheme: c for c in challenges}
    return by_scheme.get("bearer") or by_scheme.get("basic")


def scope_for(repository: str, actions: str = "pull") -> str:
    return f"repository:{repository}:{actions}"
