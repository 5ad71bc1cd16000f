"""Registry credentials in the files Docker, podman and skopeo share.

Read order (first file that knows the registry wins):
  1. `$REGISTRY_AUTH_FILE`
  2. `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`
  3. `$XDG_RUNTIME_DIR/containers/auth.json`
  4. `$XDG_CONFIG_HOME/containers/auth.json`, else `~/.config/containers/auth.json`

In each file: `credHelpers[registry]`, then `credsStore` (both run `docker-credential-<name>`),
then `auths` with a base64 `auth` of `user:password` (or an `identitytoken`). Keys may be a bare host,
a URL (`https://index.docker.io/v1/`) or `host/namespace/repo`; the longest matching key wins.
`ocibox login` writes the file `$REGISTRY_AUTH_FILE` or Docker's config.json names, mode 0600.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ocibox.errors import AuthError, StoreError

DOCKER_HUB = "docker.io"
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
_NOT_FOUND = "credentials not found"


@dataclass(frozen=True)
class Credential:
    """A user name and password, or an OAuth refresh token (Docker's `identitytoken`)."""

    username: str
    password: str
    identity_token: str | None = None


def auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """The files searched for credentials, in order."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    files.append(docker_config_file(env))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    files.append(config_home / "containers" / "auth.json")
    return files


def docker_config_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    return Path(env.get("HOME") or Path.home()) / ".docker" / "config.json"


def login_file(env: Mapping[str, str] | None = None) -> Path:
    """The file `ocibox login` writes."""
    env = os.environ if env is None else env
    if env.get("REGISTRY_AUTH_FILE"):
        return Path(env["REGISTRY_AUTH_FILE"])
    return docker_config_file(env)


def normalise_key(key: str) -> str:
    """`https://index.docker.io/v1/` → `docker.io`; `http://host:5000/` → `host:5000`."""
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    key = key.rstrip("/")
    for suffix in ("/v1", "/v2"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    host, slash, path = key.partition("/")
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
    return host + slash + path


def server_url(registry: str) -> str:
    """What Docker passes to credential helpers and uses as the `auths` key."""
    return DOCKER_HUB_KEY if normalise_key(registry) == DOCKER_HUB else registry


def lookup(registry: str, repository: str = "", env: Mapping[str, str] | None = None) -> Credential | None:
    """The credential for `registry` (and optionally `repository`), or None."""
    env = os.environ if env is None else env
    registry = normalise_key(registry)
    for path in auth_files(env):
        doc = _read(path)
        if not doc:
            continue
        helper = (doc.get("credHelpers") or {}).get(_helper_key(doc.get("credHelpers") or {}, registry))
        for name in (helper, doc.get("credsStore")):
            # A configured helper that is not installed (Docker Desktop's `desktop` on Linux) is
            # skipped rather than fatal: anonymous pulls still work.
            if name and shutil.which(f"docker-credential-{name}", path=env.get("PATH")):
                found = helper_get(name, server_url(registry), env)
                if found:
                    return found
        entry = _best_entry(doc.get("auths") or {}, registry, repository)
        if entry is not None:
            found = _decode_entry(entry, path)
            if found:
                return found
    return None


def _helper_key(helpers: Mapping[str, str], registry: str) -> str:
    for key in helpers:
        if normalise_key(key) == registry:
            return key
    return registry


def _best_entry(auths: Mapping[str, object], registry: str, repository: str) -> dict | None:
    """The entry whose key is the registry, or the longest `registry/namespace…` prefix of the repo."""
    wanted = f"{registry}/{repository}" if repository else registry
    best: tuple[int, dict] | None = None
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        norm = normalise_key(key)
        matches = norm in (wanted, registry) or wanted.startswith(norm + "/")
        if matches and (best is None or len(norm) > best[0]):
            best = (len(norm), entry)
    return best[1] if best else None


def _decode_entry(entry: dict, path: Path) -> Credential | None:
    token = entry.get("identitytoken") or None
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (TypeError, ValueError, UnicodeDecodeError):
            raise AuthError(f"malformed 'auth' entry in {path}") from None
        if not sep:
            raise AuthError(f"malformed 'auth' entry in {path}: expected base64 of user:password")
        return Credential(user, password, token)
    if entry.get("username") and entry.get("password"):
        return Credential(str(entry["username"]), str(entry["password"]), token)
    if token:
        return Credential("", "", token)
    return None


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise AuthError(f"can't read credentials file {path}: {exc.strerror}") from None
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AuthError(f"malformed credentials file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise AuthError(f"malformed credentials file {path}: not a JSON object")
    auths, helpers, store = doc.get("auths"), doc.get("credHelpers"), doc.get("credsStore")
    if auths is not None and not isinstance(auths, dict):
        raise AuthError(f"malformed credentials file {path}: 'auths' must be an object")
    names = [*(helpers.values() if isinstance(helpers, dict) else [helpers]), store]
    if not all(name is None or (isinstance(name, str) and "/" not in name) for name in names):
        raise AuthError(
            f"malformed credentials file {path}: 'credHelpers' and 'credsStore' must name "
            "helpers (docker-credential-NAME)"
        )
    return doc


def _run_helper(name: str, action: str, data: str, env: Mapping[str, str]) -> subprocess.CompletedProcess:
    program = f"docker-credential-{name}"
    try:
        return subprocess.run(
            [program, action], input=data, capture_output=True, text=True, env=dict(env), timeout=60
        )
    except FileNotFoundError:
        raise AuthError(f"credential helper {program} not found in PATH") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {program} {action} timed out") from None


def helper_get(name: str, url: str, env: Mapping[str, str] | None = None) -> Credential | None:
    """Ask `docker-credential-<name> get` for `url`; None when it has nothing."""
    env = os.environ if env is None else env
    done = _run_helper(name, "get", url, env)
    if done.returncode != 0:
        message = (done.stdout + done.stderr).strip()
        if _NOT_FOUND in message.lower():
            return None
        raise AuthError(f"credential helper docker-credential-{name} failed: {message or done.returncode}")
    try:
        doc = json.loads(done.stdout)
        user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    except (json.JSONDecodeError, AttributeError):
        raise AuthError(f"credential helper docker-credential-{name} printed malformed JSON") from None
    if user == "<token>":
        return Credential("", "", secret)
    return Credential(user, secret)


def _helper_for(doc: dict, registry: str) -> str | None:
    helpers = doc.get("credHelpers") or {}
    return helpers.get(_helper_key(helpers, registry)) or doc.get("credsStore") or None


def save(registry: str, credential: Credential, env: Mapping[str, str] | None = None) -> Path:
    """Record `credential` for `registry` as `docker login` does; return the file written."""
    env = os.environ if env is None else env
    path = login_file(env)
    doc = _read(path)
    registry = normalise_key(registry)
    key = server_url(registry)
    auths = doc.setdefault("auths", {})
    for old in [k for k in auths if normalise_key(k) == registry]:
        del auths[old]
    helper = _helper_for(doc, registry)
    if helper:
        payload = {"ServerURL": key, "Username": credential.username, "Secret": credential.password}
        if credential.identity_token:
            payload = {"ServerURL": key, "Username": "<token>", "Secret": credential.identity_token}
        done = _run_helper(helper, "store", json.dumps(payload), env)
        if done.returncode != 0:
            message = (done.stdout + done.stderr).strip()
            raise AuthError(f"credential helper docker-credential-{helper} store failed: {message}")
        auths[key] = {}
    else:
        entry = {"auth": base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()}
        if credential.identity_token:
            entry["identitytoken"] = credential.identity_token
        auths[key] = entry
    _write(path, doc)
    return path


def erase(registry: str, env: Mapping[str, str] | None = None) -> bool:
    """Forget `registry` in every file that knows it, as `docker logout`; False if none did."""
    env = os.environ if env is None else env
    registry = normalise_key(registry)
    found = False
    for path in dict.fromkeys([login_file(env), *auth_files(env)]):
        doc = _read(path)
        if not doc:
            continue
        auths = doc.get("auths") or {}
        keys = [k for k in auths if normalise_key(k) == registry]
        helper = _helper_for(doc, registry)
        if helper:
            done = _run_helper(helper, "erase", server_url(registry), env)
            if done.returncode == 0:
                found = True
            elif _NOT_FOUND not in (done.stdout + done.stderr).lower():
                message = (done.stdout + done.stderr).strip()
                raise AuthError(f"credential helper docker-credential-{helper} erase failed: {message}")
        if keys:
            for key in keys:
                del auths[key]
            _write(path, doc)
            found = True
    return found


def _write(path: Path, doc: dict) -> None:
    """Write `doc` to `path` atomically with mode 0600 (its folder 0700 when created)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out, indent="\t")
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StoreError(f"can't write credentials file {path}: {exc.strerror}") from None
