"""`ocibox run`: a user starts containers from images with the docker run flags they know,
as root and as an unprivileged user."""

import json
import os
import pty
import select
import subprocess
import time

import pytest

USERS = [None, "ocibox-test"]
USER_IDS = ["root", "rootless"]


@pytest.fixture
def busybox(images):
    """The reference of the busybox test image in the test registry."""
    return str(images["busybox"])


def _run(ocibox, user, *args, **kw):
    return ocibox("run", "--rm", *args, user=user, **kw)


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_a_user_runs_a_command_in_a_container_from_a_registry_image(ocibox, busybox, user):
    done = ocibox("run", "--rm", "-q", busybox, "echo", "hello from a container", user=user)
    assert done.stdout == "hello from a container\n"
    # The image is now in the store, pulled on first use, and runs again without the registry.
    assert "busybox" in ocibox("images", user=user).stdout
    assert _run(ocibox, user, "--pull", "never", busybox, "true").returncode == 0


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_the_exit_status_passes_through(ocibox, busybox, user):
    assert _run(ocibox, user, busybox, "sh", "-c", "exit 7", check=False).returncode == 7
    assert _run(ocibox, user, busybox, "sh", "-c", "kill -TERM $$", check=False).returncode == 143
    missing = _run(ocibox, user, busybox, "/no/such/program", check=False)
    assert missing.returncode == 127 and "/no/such/program" in missing.stderr
    not_exec = _run(ocibox, user, busybox, "/etc/passwd", check=False)
    assert not_exec.returncode == 126


def test_entrypoint_and_cmd_follow_docker(ocibox, busybox):
    # The image's Cmd is ["sh"]: with no command, sh reads stdin.
    assert _run(ocibox, None, "-i", busybox, input="echo from stdin\n").stdout == "from stdin\n"
    # A command replaces Cmd.
    assert _run(ocibox, None, busybox, "echo", "a", "b").stdout == "a b\n"
    # --entrypoint replaces the entrypoint and clears Cmd; the command becomes its arguments.
    assert _run(ocibox, None, "--entrypoint", "echo", busybox).stdout == "\n"
    assert _run(ocibox, None, "--entrypoint", "echo", busybox, "x", "y").stdout == "x y\n"


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_environment_workdir_hostname_and_user(ocibox, busybox, user, tmp_path, test_workdir):
    env_file = test_workdir / f"env-{user or 'root'}"
    env_file.write_text("# comment\nFROM_FILE=1\nPASSED_THROUGH\n")
    env_file.chmod(0o644)
    out = _run(
        ocibox,
        user,
        "-e",
        "A=1",
        "-e",
        "PASSED_THROUGH",
        "-e",
        "UNSET_HERE",
        "--env-file",
        str(env_file),
        "-w",
        "/tmp/work",
        "-h",
        "box",
        busybox,
        "sh",
        "-c",
        "env; pwd; hostname",
        env={"PASSED_THROUGH": "yes", "UNSET_HERE": None},
    ).stdout.splitlines()
    assert "A=1" in out and "FROM_FILE=1" in out and "PASSED_THROUGH=yes" in out
    assert not any(line.startswith("UNSET_HERE") for line in out)
    assert any(line.startswith("PATH=/usr/local/sbin") for line in out), "the image's Env applies"
    assert "HOME=/root" in out
    assert out[-2:] == ["/tmp/work", "box"]
    assert _run(ocibox, user, "-u", "app", busybox, "id").stdout.startswith("uid=1000(app) gid=1000(app)")
    assert _run(ocibox, user, "-u", "1000:65534", busybox, "id", "-g").stdout == "65534\n"
    assert _run(ocibox, user, "-u", "app", busybox, "sh", "-c", "echo $HOME").stdout == "/home/app\n"
    unknown = _run(ocibox, user, "-u", "nosuchuser", busybox, "true", check=False)
    assert unknown.returncode != 0 and "nosuchuser" in unknown.stderr


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_volumes_and_tmpfs(ocibox, busybox, user, test_workdir):
    host = test_workdir / f"vol-{user or 'root'}"
    host.mkdir()
    (host / "in.txt").write_text("from the host\n")
    os.chmod(host, 0o777)
    os.chmod(host / "in.txt", 0o666)
    done = _run(
        ocibox,
        user,
        "-v",
        f"{host}:/data",
        "-v",
        f"{host}:/ro:ro",
        "--tmpfs",
        "/scratch",
        busybox,
        "sh",
        "-c",
        "cat /data/in.txt; echo new > /data/out.txt; echo x > /ro/y 2>/dev/null || echo ro refused;"
        " mount | grep ' /scratch ' | cut -d' ' -f5",
    )
    assert done.stdout.splitlines() == ["from the host", "ro refused", "tmpfs"]
    assert (host / "out.txt").read_text() == "new\n"
    # A relative host path is taken from the working directory and created when missing.
    made = _run(ocibox, user, "-v", "rel-dir:/rel", busybox, "sh", "-c", "touch /rel/f", cwd=host)
    assert made.returncode == 0 and (host / "rel-dir" / "f").exists()


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_containers_cannot_change_the_image(ocibox, busybox, user):
    _run(ocibox, user, busybox, "sh", "-c", "rm /bin/ls; echo changed > /etc/hostname")
    after = _run(ocibox, user, busybox, "sh", "-c", "ls /bin/ls; cat /etc/passwd | head -1")
    assert after.stdout.splitlines() == ["/bin/ls", "root:x:0:0:root:/root:/bin/sh"]
    ro = _run(ocibox, user, "--read-only", busybox, "touch", "/x", check=False)
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_the_container_sees_only_its_own_processes_and_network_none_is_loopback(ocibox, busybox, user):
    ps = _run(ocibox, user, busybox, "ps", "-o", "pid,comm").stdout.split("\n")[1:]
    assert len([line for line in ps if line.strip()]) <= 3
    links = _run(ocibox, user, "--network", "none", busybox, "ls", "/sys/class/net").stdout.split()
    assert links == ["lo"]


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_image_file_owners_show_inside(ocibox, busybox, user):
    out = _run(ocibox, user, busybox, "stat", "-c", "%u:%g %n", "/home/app", "/root").stdout
    assert out.splitlines() == ["1000:1000 /home/app", "0:0 /root"]


def test_limits_as_root(ocibox, busybox):
    assert (
        _run(ocibox, None, "--ulimit", "nofile=1234:2345", busybox, "sh", "-c", "ulimit -n").stdout
        == "1234\n"
    )
    killed = _run(
        ocibox,
        None,
        "--memory",
        "32m",
        busybox,
        "sh",
        "-c",
        'x=$(head -c 67108864 /dev/zero | tr "\\0" a); echo survived ${#x}',
        check=False,
    )
    assert killed.returncode == 137 and "survived" not in killed.stdout
    unlimited = _run(
        ocibox, None, busybox, "sh", "-c", 'x=$(head -c 67108864 /dev/zero | tr "\\0" a); echo ${#x}'
    )
    assert unlimited.stdout == "67108864\n"
    forks = "for i in $(seq 40); do sleep 2 & done; wait; echo done"
    limited = _run(ocibox, None, "--pids-limit", "20", busybox, "sh", "-c", forks, check=False)
    assert limited.returncode != 0 and "done" not in limited.stdout and "fork" in limited.stderr
    assert _run(ocibox, None, busybox, "sh", "-c", forks).stdout == "done\n"


def test_a_limit_that_cannot_be_applied_rootless_is_an_error(ocibox, busybox):
    done = _run(ocibox, "ocibox-test", "--memory", "32m", busybox, "true", check=False)
    assert done.returncode == 125 and "cgroup" in done.stderr


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_rm_removes_the_container_and_without_it_the_container_is_kept(ocibox, busybox, user):
    ocibox("pull", "-q", busybox, user=user)
    containers = ocibox.context(user).root / "containers"
    _run(ocibox, user, busybox, "sh", "-c", "mkdir -p /a/b; echo x > /a/b/c")
    assert not any(containers.iterdir()) if containers.exists() else True
    ocibox("run", "--name", "kept", busybox, "touch", "/made-here", user=user)
    kept = list(containers.iterdir())
    assert len(kept) == 1
    state = json.loads((kept[0] / "state.json").read_text())
    assert state["Name"] == "kept" and state["Status"] == "exited" and state["ExitCode"] == 0
    taken = ocibox("run", "--name", "kept", busybox, "true", user=user, check=False)
    assert taken.returncode == 125 and "already in use" in taken.stderr


@pytest.mark.parametrize("user", USERS, ids=USER_IDS)
def test_a_bundle_made_by_unpack_runs(ocibox, busybox, user, test_workdir):
    bundle = test_workdir / f"bundle-{user or 'root'}"
    if user:
        bundle.mkdir()
        os.chown(bundle, *_ids(user))
        bundle = bundle / "b"
    ocibox("unpack", busybox, str(bundle), user=user)
    assert (bundle / "config.json").is_file() and (bundle / "rootfs" / "bin" / "busybox").is_file()
    assert _run(ocibox, user, str(bundle), "echo", "from a bundle").stdout == "from a bundle\n"


def _ids(user):
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def test_an_interactive_shell_works_on_a_terminal(ocibox, busybox):
    ocibox("pull", "-q", busybox)
    pid, fd = pty.fork()
    if pid == 0:
        command = ocibox.context(None).command
        os.execve(command[0], [*command, "run", "--rm", "-it", busybox, "sh"], ocibox.env)
    output = b""
    try:
        os.write(fd, b"echo $((6*7)); tty; exit 3\n")
        deadline = time.time() + 20
        while time.time() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = output.decode(errors="replace")
    assert "42" in text and "/dev/pts/" in text
    assert os.waitstatus_to_exitcode(status) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ulimit", "bogus=1", "IMG", "true"], "invalid --ulimit"),
        (["--memory", "lots", "IMG", "true"], "invalid --memory"),
        (["--memory", "1m", "IMG", "true"], "minimum memory limit is 6m"),
        (["-w", "relative/dir", "IMG", "true"], "must be an absolute path"),
        (["--cpus", "-1", "IMG", "true"], "invalid --cpus"),
        (["-v", "relative-ctr-path", "IMG", "true"], "must be absolute"),
        (["-e", "BAD KEY=1", "IMG", "true"], "invalid environment variable"),
        (["--env-file", "/nonexistent", "IMG", "true"], "cannot read env file"),
        (["localhost:1/nothing:here", "true"], "ocibox: "),
        (["Bad/Name", "true"], "lowercase"),
    ],
)
def test_bad_run_input_is_one_clear_line(ocibox, busybox, args, message):
    args = [busybox if a == "IMG" else a for a in args]
    done = ocibox("run", "--rm", "-q", *args, check=False)
    assert done.returncode == 125, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_killing_ocibox_stops_the_container_and_leaves_nothing(ocibox, busybox):
    ocibox("pull", "-q", busybox)
    proc = subprocess.Popen(
        [*ocibox.context(None).command, "run", "--rm", busybox, "sleep", "1000"],
        env=ocibox.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)
    proc.terminate()
    proc.wait(10)
    time.sleep(0.3)
    leftover = subprocess.run(["pgrep", "-f", "sleep 1000"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""
    assert not any((ocibox.root / "containers").iterdir())


def test_a_user_removes_an_image_whose_rootfs_holds_files_of_other_owners(ocibox_user, busybox):
    ocibox_user("run", "--rm", "-q", busybox, "true")
    rootfs = ocibox_user.root / "rootfs"
    assert any(p.is_dir() for p in rootfs.iterdir())
    assert any(p.stat().st_uid >= 100000 for p in rootfs.glob("*/home/app")), "unpacked with subordinate ids"
    ocibox_user("rmi", busybox)
    assert not any(p.is_dir() for p in rootfs.iterdir())
