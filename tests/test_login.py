"""`ocibox login` / `logout` and pulls that need them, against real registries with auth.

auth_registry is docker-registry behind htpasswd (Basic); token_registry is `auth: token` with a
token server like Docker Hub's (anonymous may pull public/*, the user anything).
"""

from __future__ import annotations

import base64
import json
import stat


def _config(ocibox) -> dict:
    return json.loads((ocibox.home / ".docker" / "config.json").read_text())


def test_login_with_password_stdin_then_pull_from_a_basic_auth_registry(ocibox, auth_registry):
    reg = auth_registry
    out = ocibox("login", "-u", reg.username, "--password-stdin", reg.host, input=reg.password + "\n")
    assert "Login Succeeded" in out.stdout
    path = ocibox.home / ".docker" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = _config(ocibox)["auths"][reg.host]
    assert base64.b64decode(entry["auth"]).decode() == f"{reg.username}:{reg.password}"

    pulled = ocibox("pull", "-q", reg.seeded["busybox"])
    assert pulled.stdout.strip() == reg.seeded["busybox"]
    assert pulled.stderr == ""

    out = ocibox("logout", reg.host)
    assert f"Removing login credentials for {reg.host}" in out.stdout
    assert reg.host not in _config(ocibox)["auths"]
    again = ocibox("logout", reg.host)
    assert f"Not logged in to {reg.host}" in again.stdout


def test_pull_without_login_says_authentication_is_required(ocibox, auth_registry):
    result = ocibox("pull", auth_registry.seeded["busybox"], check=False)
    assert result.returncode == 125
    assert result.stderr.strip().splitlines()[-1].startswith("ocibox: authentication required by")
    assert "ocibox login" in result.stderr
    assert "Traceback" not in result.stderr
    assert list((ocibox.root / "blobs" / "sha256").iterdir()) == []


def test_a_wrong_password_is_refused_and_nothing_is_written(ocibox, auth_registry):
    result = ocibox(
        "login",
        "-u",
        auth_registry.username,
        "--password-stdin",
        auth_registry.host,
        input="wrong\n",
        check=False,
    )
    assert result.returncode == 125
    assert result.stderr == f"ocibox: login to {auth_registry.host} failed: incorrect username or password\n"
    assert not (ocibox.home / ".docker" / "config.json").exists()


def test_login_to_a_token_registry_then_pull_a_private_image(ocibox, token_registry):
    reg = token_registry
    denied = ocibox("pull", reg.seeded["private/busybox"], check=False)
    assert denied.returncode == 125
    assert "ocibox: " in denied.stderr and "Traceback" not in denied.stderr
    assert "ocibox login" in denied.stderr

    bad = ocibox("login", "-u", reg.username, "--password-stdin", reg.host, input="nope", check=False)
    assert bad.returncode == 125
    assert "incorrect username or password" in bad.stderr

    ocibox("login", "-u", reg.username, "--password-stdin", reg.host, input=reg.password)
    pulled = ocibox("pull", "-q", reg.seeded["private/busybox"])
    assert pulled.stdout.strip() == reg.seeded["private/busybox"]


def test_anonymous_pull_from_a_token_registry_uses_one_token(ocibox, token_registry):
    token_registry.token_server.requests.clear()
    pulled = ocibox("pull", "-q", token_registry.seeded["public/busybox"])
    assert pulled.stdout.strip() == token_registry.seeded["public/busybox"]
    # One token for the manifest and all the parallel blob downloads.
    assert [r.scopes for r in token_registry.token_server.requests] == [["repository:public/busybox:pull"]]


def test_registry_auth_file_is_where_login_writes_and_pull_reads(ocibox, auth_registry, tmp_path):
    reg = auth_registry
    authfile = tmp_path / "auth.json"
    env = {"REGISTRY_AUTH_FILE": authfile}
    ocibox("login", "-u", reg.username, "--password-stdin", reg.host, input=reg.password, env=env)
    assert reg.host in json.loads(authfile.read_text())["auths"]
    assert stat.S_IMODE(authfile.stat().st_mode) == 0o600
    assert not (ocibox.home / ".docker" / "config.json").exists()
    ocibox("pull", "-q", reg.seeded["busybox"], env=env)


def test_podman_style_auth_json_is_honoured(ocibox, auth_registry):
    reg = auth_registry
    auth = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    runtime_dir = ocibox.env["XDG_RUNTIME_DIR"]
    path = f"{runtime_dir}/containers/auth.json"
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"auths": {reg.host: {"auth": auth}}}, f)
    ocibox("pull", "-q", reg.seeded["busybox"])


def test_skopeo_reads_what_ocibox_login_wrote(ocibox, auth_registry, tmp_path):
    import subprocess

    reg = auth_registry
    authfile = tmp_path / "auth.json"
    ocibox(
        "login",
        "-u",
        reg.username,
        "--password-stdin",
        reg.host,
        input=reg.password,
        env={"REGISTRY_AUTH_FILE": authfile},
    )
    out = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=false",
            "--authfile",
            str(authfile),
            f"docker://{reg.seeded['busybox']}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["Architecture"] == "amd64"


def test_login_without_a_terminal_needs_the_username_flag(ocibox, auth_registry):
    result = ocibox("login", auth_registry.host, input="", check=False)
    assert result.returncode == 125
    assert result.stderr == "ocibox: username required: use -u USER (no terminal to ask on)\n"


def test_login_and_pull_through_a_credential_helper(ocibox, auth_registry, tmp_path):
    """credsStore names docker-credential-<name>: login stores there, pull gets from there."""
    from test_registry import HELPER

    reg = auth_registry
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-ocitest"
    helper.write_text(HELPER)
    helper.chmod(0o755)
    db = tmp_path / "helper-db.json"
    env = {"PATH": f"{bindir}:{ocibox.env['PATH']}", "HELPER_DB": db}
    config = ocibox.home / ".docker" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"credsStore": "ocitest"}))

    ocibox("login", "-u", reg.username, "--password-stdin", reg.host, input=reg.password, env=env)
    assert json.loads(db.read_text()) == {reg.host: [reg.username, reg.password]}
    assert json.loads(config.read_text())["auths"] == {reg.host: {}}  # no secret in the file
    ocibox("pull", "-q", reg.seeded["busybox"], env=env)
    ocibox("logout", reg.host, env=env)
    assert json.loads(db.read_text()) == {}
