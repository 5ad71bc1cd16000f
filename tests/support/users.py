"""Running ocibox (and anything else) as root or as the unprivileged test user, in a private world.

`OciboxRunner` is the `ocibox` fixture: `ocibox(*args, user=None, env=None, input=None,
check=True, timeout=120)` runs `python -m ocibox ARGS` with a store, HOME and XDG folders of its
own. As root it uses the test interpreter and the repo's src/. With `user="ocibox-test"` it runs
`/usr/bin/python3` through `setpriv` as that user, with PYTHONPATH pointing at a world-readable
copy of src/ and OCIBOX_RUNTIME at a world-readable copy of runtime/ocibox-runtime (if built).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TEST_USER = "ocibox-test"
REPO = Path(__file__).resolve().parents[2]
# Variables of the host that would leak another store, credentials or registry settings in.
SCRUBBED = (
    "OCIBOX_ROOT",
    "OCIBOX_INSECURE_REGISTRIES",
    "OCIBOX_RUNTIME",
    "DOCKER_CONFIG",
    "REGISTRY_AUTH_FILE",
    "XDG_DATA_HOME",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
    "XDG_RUNTIME_DIR",
    "XDG_STATE_HOME",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
)


class CommandFailed(AssertionError):
    """A command run by the tests failed while `check=True`; shows its stdout and stderr."""


def user_ids(user: str = TEST_USER) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def user_exists(user: str = TEST_USER) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("PYTEST_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.setdefault("LANG", "C.UTF-8")
    return env


def setpriv_prefix(user: str) -> list[str]:
    uid, gid = user_ids(user)
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups"]


def check_result(
    cmd: list[str], result: subprocess.CompletedProcess, check: bool
) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        raise CommandFailed(
            f"command failed with exit code {result.returncode}: {shlex.join(cmd)}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def as_user(
    cmd: list[str],
    user: str = TEST_USER,
    env: dict | None = None,
    input: str | None = None,  # noqa: A002 - same name as subprocess.run's
    check: bool = True,
    timeout: float = 120,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `cmd` as `user` (setpriv, supplementary groups from /etc/group), text mode, captured.

    `env` is the whole environment (default: this one, scrubbed of OCIBOX_*, XDG_*, proxies;
    HOME set to the user's home). `check=True` raises CommandFailed with stdout/stderr shown.
    """
    if env is None:
        env = base_env()
        env["HOME"] = pwd.getpwnam(user).pw_dir
        env["USER"] = env["LOGNAME"] = user
    full = setpriv_prefix(user) + [str(c) for c in cmd]
    result = subprocess.run(
        full, env=env, input=input, capture_output=True, text=True, timeout=timeout, cwd=cwd or "/"
    )
    return check_result(full, result, check)


def readable_copy(src: Path, dest: Path) -> Path:
    """Copy a tree so that any user can read it: folders 0755, files 0644 (or 0755 if executable)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    os.chmod(dest, 0o755)
    for dirpath, dirnames, filenames in os.walk(dest):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            path = os.path.join(dirpath, f)
            os.chmod(path, 0o755 if os.stat(path).st_mode & 0o111 else 0o644)
    return dest


@dataclass
class SharedCode:
    """World-readable copies of src/ and the runtime binary, made once per session."""

    src: Path
    runtime: Path | None


def make_shared_code(base: Path) -> SharedCode:
    """Copy src/ (and runtime/ocibox-runtime if built) under `base`, readable by everyone."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    src = readable_copy(REPO / "src", base / "src")
    runtime = None
    built = REPO / "runtime" / "ocibox-runtime"
    if built.is_file():
        (base / "runtime").mkdir(mode=0o755, exist_ok=True)
        runtime = base / "runtime" / "ocibox-runtime"
        shutil.copy2(built, runtime)
        os.chmod(runtime, 0o755)
    return SharedCode(src=src, runtime=runtime)


@dataclass
class Context:
    """The private world of one user in one test: its store, HOME and environment."""

    user: str | None
    home: Path
    root: Path
    env: dict[str, str]
    command: list[str]


class OciboxRunner:
    """The `ocibox` fixture. Call it like the CLI: `ocibox("pull", ref)`; see the module docstring.

    `.root` / `.home` / `.env` describe root's world; `.context(user)` any user's (created on
    first use, owned by that user). Each test gets new ones.
    """

    def __init__(self, base: Path, shared: SharedCode, default_user: str | None = None):
        self.base = Path(base)
        self.shared = shared
        self.default_user = default_user
        self._contexts: dict[str | None, Context] = {}

    def context(self, user: str | None = None) -> Context:
        if user not in self._contexts:
            self._contexts[user] = self._make_context(user)
        return self._contexts[user]

    def for_user(self, user: str | None) -> OciboxRunner:
        """The same runner (same worlds) with another default user."""
        other = OciboxRunner(self.base, self.shared, user)
        other._contexts = self._contexts
        return other

    @property
    def root(self) -> Path:
        """OCIBOX_ROOT of the default user."""
        return self.context(self.default_user).root

    @property
    def home(self) -> Path:
        return self.context(self.default_user).home

    @property
    def env(self) -> dict[str, str]:
        return self.context(self.default_user).env

    def _make_context(self, user: str | None) -> Context:
        name = user or "root"
        top = self.base / name
        home = top / "home"
        dirs = {
            "home": home,
            "XDG_DATA_HOME": home / ".local" / "share",
            "XDG_CONFIG_HOME": home / ".config",
            "XDG_CACHE_HOME": home / ".cache",
            "XDG_STATE_HOME": home / ".local" / "state",
            "XDG_RUNTIME_DIR": top / "run",
            "store": top / "store",
        }
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        top.mkdir(mode=0o755)
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(dirs["XDG_RUNTIME_DIR"], 0o700)
        env = base_env()
        env.update({k: str(v) for k, v in dirs.items() if k.startswith("XDG_")})
        env["HOME"] = str(home)
        env["OCIBOX_ROOT"] = str(dirs["store"])
        env["COLUMNS"] = "200"
        if user is None:
            env["PYTHONPATH"] = str(REPO / "src")
            if (REPO / "runtime" / "ocibox-runtime").is_file():
                env["OCIBOX_RUNTIME"] = str(REPO / "runtime" / "ocibox-runtime")
            command = [sys.executable, "-m", "ocibox"]
        else:
            uid, gid = user_ids(user)
            for dirpath, _, _ in os.walk(top):
                os.chown(dirpath, uid, gid)
            env["PYTHONPATH"] = str(self.shared.src)
            env["USER"] = env["LOGNAME"] = user
            if self.shared.runtime is not None:
                env["OCIBOX_RUNTIME"] = str(self.shared.runtime)
            command = setpriv_prefix(user) + ["/usr/bin/python3", "-m", "ocibox"]
        return Context(user=user, home=home, root=dirs["store"], env=env, command=command)

    def __call__(
        self,
        *args,
        user: str | None = ...,  # type: ignore[assignment]
        env: dict | None = None,
        input: str | None = None,  # noqa: A002 - same name as subprocess.run's
        check: bool = True,
        timeout: float = 120,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run `ocibox ARGS…`; `env` adds to (or, with value None, removes from) the environment."""
        if user is ...:
            user = self.default_user
        ctx = self.context(user)
        full_env = dict(ctx.env)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = str(value)
        cmd = ctx.command + [str(a) for a in args]
        result = subprocess.run(
            cmd,
            env=full_env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or ctx.home,
        )
        return check_result(cmd, result, check)
