"""`make demo`: ocibox's main job on a built-in example, offline.

A local docker-registry is started on a free port and seeded with a busybox image built from
Debian's busybox-static; then ocibox pulls it, shows it and runs it, builds an image from the
static busybox binary with no Docker, runs that, compiles it into one executable, and runs the
executable as an unprivileged user, as a user would type it. The demo's
store is a temporary folder, removed at the end (set OCIBOX_DEMO_KEEP=1 to keep it).

The demo is a list of steps (`STEPS`); each is a title and a function of the shared `Demo`
state.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.busybox import build_busybox_layouts  # noqa: E402
from support.images import push_busybox  # noqa: E402
from support.registry import Registry, start_registry  # noqa: E402


@dataclass
class Demo:
    """What the steps share: the work folder, the registry, the image reference, ocibox's env."""

    workdir: Path
    registry: Registry | None = None
    ref: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def ocibox(self, *args: str) -> None:
        """Run `ocibox ARGS` and show it as a user would see it; stop the demo if it fails."""
        print(f"$ ocibox {shlex.join(args)}", flush=True)
        cmd = [sys.executable, "-m", "ocibox", *args]
        result = subprocess.run(cmd, env=self.env, cwd=self.workdir)
        print(flush=True)
        if result.returncode != 0:
            raise DemoFailed(f"`ocibox {shlex.join(args)}` exited with status {result.returncode}")


class DemoFailed(Exception):
    pass


@dataclass
class Step:
    title: str
    run: Callable[[Demo], None]


def start_local_registry(demo: Demo) -> None:
    demo.registry = start_registry(demo.workdir / "registry")
    print(f"docker-registry listening on {demo.registry.url} (storage in {demo.registry.storage})")


def seed_busybox(demo: Demo) -> None:
    layouts = build_busybox_layouts(demo.workdir / "layouts")
    print("built a 2-layer busybox image from Debian's busybox-static (an OCI layout)")
    push_busybox(layouts, demo.registry, "busybox", "demo/busybox")
    demo.ref = demo.registry.ref("demo/busybox")
    print(f"pushed it with skopeo as {demo.ref}")


def pull(demo: Demo) -> None:
    demo.ocibox("pull", demo.ref)


def list_images(demo: Demo) -> None:
    demo.ocibox("images")


def inspect(demo: Demo) -> None:
    demo.ocibox("inspect", "--format", "{{json .Config.config}}", demo.ref)


def run_pulled(demo: Demo) -> None:
    demo.ocibox("run", "--rm", demo.ref, "sh", "-c", "echo hello from $(uname -s) in a container; id")


def build_from_binary(demo: Demo) -> None:
    demo.ocibox(
        "build",
        "--from-binary",
        "/bin/busybox",
        "--tag",
        "localhost/demo/hello:1",
        "--cmd",
        '["echo", "hello from an image built with ocibox build"]',
    )


def run_built(demo: Demo) -> None:
    demo.ocibox("run", "--rm", "localhost/demo/hello:1")


def compile_built(demo: Demo) -> None:
    demo.ocibox("compile", "localhost/demo/hello:1", "-o", str(demo.workdir / "hello"))
    size = (demo.workdir / "hello").stat().st_size
    print(f"{demo.workdir / 'hello'}: one executable, {size / 1e6:.1f} MB")


def run_compiled_as_user(demo: Demo) -> None:
    """The executable needs nothing installed: run it as an unprivileged user, from /."""
    exe = demo.workdir / "hello"
    demo.workdir.chmod(0o755)
    exe.chmod(0o755)
    user = "ocibox-test"
    if os.geteuid() == 0:
        cmd = [
            "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--init-groups",
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            f"HOME=/home/{user}",
            str(exe),
        ]
    else:
        cmd = [str(exe)]
    for args in ([], ["echo", "arguments replace the image's Cmd, as with docker run"]):
        print(f"$ {shlex.join(cmd[-1:] + args)}   # as {user if os.geteuid() == 0 else 'you'}", flush=True)
        result = subprocess.run(cmd + args, cwd="/")
        if result.returncode != 0:
            raise DemoFailed(f"the compiled executable exited with status {result.returncode}")


STEPS: list[Step] = [
    Step("Start a local registry", start_local_registry),
    Step("Build a busybox image and push it", seed_busybox),
    Step("Pull it into ocibox's store", pull),
    Step("List the images in the store", list_images),
    Step("Inspect the image", inspect),
    Step("Run it as a container", run_pulled),
    Step("Build an image from a static binary, no Docker", build_from_binary),
    Step("Run the built image", run_built),
    Step("Compile the built image into one executable", compile_built),
    Step("Run the executable as an unprivileged user", run_compiled_as_user),
]


def demo_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCIBOX_")}
    env["OCIBOX_ROOT"] = str(workdir / "store")
    env["PYTHONPATH"] = str(REPO / "src")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ocibox-demo-"))
    demo = Demo(workdir=workdir, env=demo_env(workdir))
    print(f"ocibox demo: store in {demo.env['OCIBOX_ROOT']}\n")
    try:
        for number, step in enumerate(STEPS, 1):
            print(f"== {number}. {step.title}", flush=True)
            step.run(demo)
            print(flush=True)
    except (DemoFailed, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        if demo.registry is not None:
            demo.registry.stop()
        if os.environ.get("OCIBOX_DEMO_KEEP"):
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("demo finished: registry stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
