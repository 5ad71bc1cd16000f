"""A user's image config and docker-run options become an OCI runtime config.json as Docker would
run them, valid against the runtime-spec schema Debian ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocibox.errors import OciboxError
from ocibox.spec import DEFAULT_CAPS, DEFAULT_PATH, RunOptions, resolve_user, runtime_config
from support.schemas import validate

IMAGE = {
    "architecture": "amd64",
    "os": "linux",
    "created": "2024-01-01T00:00:00Z",
    "config": {
        "Entrypoint": ["/docker-entrypoint.sh"],
        "Cmd": ["nginx", "-g", "daemon off;"],
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "NGINX_VERSION=1.25"],
        "WorkingDir": "/srv",
        "ExposedPorts": {"80/tcp": {}, "443/tcp": {}},
        "Volumes": {"/data": {}},
        "Labels": {"maintainer": "someone"},
        "StopSignal": "SIGQUIT",
    },
    "rootfs": {"type": "layers", "diff_ids": []},
}


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    etc = tmp_path / "rootfs" / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\n"
        "app:x:1000:1000::/home/app:/bin/sh\n"
    )
    (etc / "group").write_text("root:x:0:\nwww:x:33:\napp:x:1000:\naudio:x:29:app,www\nvideo:x:44:app\n")
    return tmp_path / "rootfs"


@pytest.mark.parametrize(
    "opts,args",
    [
        (RunOptions(), ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]),
        (RunOptions(args=["sh", "-c", "echo hi"]), ["/docker-entrypoint.sh", "sh", "-c", "echo hi"]),
        (RunOptions(entrypoint=["/bin/sh"]), ["/bin/sh"]),
        (RunOptions(entrypoint=["/bin/sh"], args=["-c", "id"]), ["/bin/sh", "-c", "id"]),
        (RunOptions(entrypoint=[], args=["ls"]), ["ls"]),
    ],
)
def test_entrypoint_and_cmd_follow_docker_run(opts: RunOptions, args: list[str]) -> None:
    assert runtime_config(IMAGE, opts)["process"]["args"] == args


def test_no_command_at_all_is_an_error() -> None:
    with pytest.raises(OciboxError, match="no command"):
        runtime_config({"config": {}}, RunOptions())


def test_env_workdir_and_annotations() -> None:
    cfg = runtime_config(IMAGE, RunOptions(env=["NGINX_VERSION=2", "EXTRA=1"], hostname="web"))
    env = cfg["process"]["env"]
    assert env[:3] == ["PATH=/usr/local/bin:/usr/bin:/bin", "NGINX_VERSION=2", "EXTRA=1"]
    assert "HOSTNAME=web" in env and "HOME=/" in env
    assert cfg["process"]["cwd"] == "/srv" and cfg["hostname"] == "web"
    assert runtime_config({"config": {"Cmd": ["x"]}}, RunOptions())["process"]["env"][0] == DEFAULT_PATH
    assert runtime_config({"config": {"Cmd": ["x"]}}, RunOptions())["process"]["cwd"] == "/"
    assert runtime_config(IMAGE, RunOptions(workdir="/tmp"))["process"]["cwd"] == "/tmp"
    ann = cfg["annotations"]
    assert ann["org.opencontainers.image.exposedPorts"] == "443/tcp,80/tcp"
    assert ann["ocibox.volumes"] == "/data" and ann["maintainer"] == "someone"
    assert ann["org.opencontainers.image.stopSignal"] == "SIGQUIT"
    assert ann["org.opencontainers.image.architecture"] == "amd64"


@pytest.mark.parametrize(
    "spec,uid,gid,extra,home",
    [
        (None, 0, 0, [], "/root"),
        ("app", 1000, 1000, [29, 44], "/home/app"),
        ("1000", 1000, 1000, [29, 44], "/home/app"),
        ("www:video", 33, 44, [], "/var/www"),
        ("1000:33", 1000, 33, [], "/home/app"),
        ("4242", 4242, 0, [], "/"),
        ("4242:4343", 4242, 4343, [], "/"),
    ],
)
def test_users_are_resolved_in_the_rootfs(rootfs: Path, spec, uid, gid, extra, home) -> None:
    user = resolve_user(rootfs, spec)
    assert (user.uid, user.gid, user.additional_gids, user.home) == (uid, gid, extra, home)


def test_unknown_user_or_group_is_an_error(rootfs: Path) -> None:
    with pytest.raises(OciboxError, match="unable to find user nobody"):
        resolve_user(rootfs, "nobody")
    with pytest.raises(OciboxError, match="unable to find group nogroup"):
        resolve_user(rootfs, "app:nogroup")


def test_passwd_symlinked_out_of_the_rootfs_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(OciboxError):
        resolve_user(tmp_path / "rootfs", "root-on-the-host-only-" + "x")
    assert resolve_user(tmp_path / "rootfs", "0").home == "/"


def test_root_defaults_are_dockers(rootfs: Path) -> None:
    cfg = runtime_config(IMAGE, RunOptions(user="app"), rootfs=rootfs)
    caps = cfg["process"]["capabilities"]
    assert caps["bounding"] == DEFAULT_CAPS and caps["effective"] == [] and len(DEFAULT_CAPS) == 14
    root = runtime_config(IMAGE, RunOptions(), rootfs=rootfs)["process"]["capabilities"]
    assert root["effective"] == DEFAULT_CAPS == root["permitted"]
    assert cfg["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [29, 44]}
    assert [m["destination"] for m in cfg["mounts"][:6]] == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
    ]
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"] and "/proc/sys" in cfg["linux"]["readonlyPaths"]
    assert [n["type"] for n in cfg["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount"]
    assert cfg["process"]["rlimits"][0]["type"] == "RLIMIT_NOFILE"


def test_rootless_and_network_none() -> None:
    cfg = runtime_config(IMAGE, RunOptions(rootless=True, network="none"))
    assert [n["type"] for n in cfg["linux"]["namespaces"]] == [
        "pid",
        "ipc",
        "uts",
        "mount",
        "network",
        "user",
    ]
    assert cfg["linux"]["uidMappings"][0]["containerID"] == 0
    assert "resources" not in cfg["linux"]
    assert all("gid=5" not in m.get("options", []) for m in cfg["mounts"])


@pytest.mark.parametrize(
    "opts",
    [
        RunOptions(),
        RunOptions(rootless=True),
        RunOptions(rootless=True, network="none", terminal=True),
        RunOptions(
            args=["x"],
            env=["A=1"],
            user="1000:1000",
            hostname="h",
            read_only=True,
            volumes=[("/srv", "/data", True), ("/tmp", "/scratch", False)],
            tmpfs=["/run:size=64m,exec"],
            memory=64 << 20,
            cpus=0.5,
            pids_limit=100,
            ulimits=[("nproc", 100, 200)],
            files={"/etc/hosts": "/etc/hosts"},
        ),
    ],
)
def test_configs_are_valid_against_the_runtime_spec_schema(opts: RunOptions) -> None:
    validate(runtime_config(IMAGE, opts), "runtime-config")


def test_run_options_reach_the_config() -> None:
    cfg = runtime_config(
        IMAGE,
        RunOptions(
            volumes=[("/srv", "/data", True)],
            tmpfs=["/run:size=64m,exec"],
            memory=64 << 20,
            cpus=0.5,
            pids_limit=100,
            read_only=True,
            ulimits=[("nproc", 100, 200)],
        ),
    )
    data = next(m for m in cfg["mounts"] if m["destination"] == "/data")
    assert data["source"] == "/srv" and "ro" in data["options"]
    run = next(m for m in cfg["mounts"] if m["destination"] == "/run")
    assert "noexec" not in run["options"] and "size=64m" in run["options"]
    res = cfg["linux"]["resources"]
    assert res["memory"]["limit"] == 64 << 20 and res["cpu"]["quota"] == 50000 and res["pids"]["limit"] == 100
    assert cfg["root"]["readonly"] is True
    assert {"type": "RLIMIT_NPROC", "soft": 100, "hard": 200} in cfg["process"]["rlimits"]
