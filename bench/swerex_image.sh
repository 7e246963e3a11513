#!/usr/bin/env bash
# The image of the "swe-rex docker" row of bench/peers.py: the debootstrap base plus swe-rex in a venv at /opt/swerex,
# with `swerex-remote` on PATH (what SWE-ReX's DockerDeployment runs when python_standalone_dir is unset).
# Built with no network: swe-rex (the version in .venv-bench) and its dependencies are downloaded as wheels on the
# host for the image's Python, cached in ~/.cache/shellq/, and installed in the image with `pip install --no-index`.
# usage: bench/swerex_image.sh [--force]      (reuses shellq-bench-swerex:latest when it exists, unless --force)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=shellq-bench-swerex:latest
base=shellq-base:bookworm
build_args=()
if [[ ${1:-} == --force ]]; then
    build_args=(--no-cache)
elif docker image inspect "$tag" >/dev/null 2>&1; then
    echo "image $tag exists"
    exit 0
fi
version=$(.venv-bench/bin/python -c 'import swerex; print(swerex.__version__)')
read -r pyversion machine < <(docker run --rm --entrypoint python3 "$base" -c \
    'import platform; print(platform.python_version(), platform.machine())')
wheels=~/.cache/shellq/swerex-$version-py$pyversion-$machine
if ! compgen -G "$wheels/swe_rex-*.whl" >/dev/null; then
    echo "downloading swe-rex $version and its dependencies for Python $pyversion ($machine) into $wheels"
    platforms=()
    for p in manylinux2014 manylinux_2_17 manylinux_2_28 manylinux_2_34; do
        platforms+=(--platform "${p}_$machine")
    done
    rm -rf "$wheels" "$wheels.part"  # downloaded whole or not at all
    .venv-bench/bin/python -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --dest "$wheels.part" --python-version "$pyversion" --implementation cp "${platforms[@]}" "swe-rex==$version"
    mv "$wheels.part" "$wheels"
fi
context=$(mktemp -d "${TMPDIR:-/tmp}/shellq-swerex.XXXXXX")
trap 'rm -rf "$context"' EXIT
cp -r "$wheels" "$context/wheels"
cat >"$context/Dockerfile" <<EOF
FROM $base
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/swerex \\
 && /opt/swerex/bin/pip install --quiet --no-index --find-links /tmp/wheels swe-rex==$version \\
 && rm -rf /tmp/wheels && ln -s /opt/swerex/bin/swerex-remote /usr/local/bin/swerex-remote \\
 && swerex-remote --version
EOF
echo "docker build -t $tag (FROM $base, swe-rex $version) ..."
docker build --quiet "${build_args[@]}" -t "$tag" "$context" >/dev/null
echo "image $tag built"
