#!/usr/bin/env bash
# A minimal Debian image with python3 (and venv, git, procps) for hosts with no registry: debootstrap into a folder, `docker import` it.
# usage: containers/base-image.sh [TAG [SUITE]]     (default: shellq-base:bookworm bookworm)
# Reuses the image when it exists. Needs root, debootstrap and a Docker engine (scripts/docker-engine).
set -euo pipefail
tag=${1:-shellq-base:bookworm}
suite=${2:-bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag exists"
    exit 0
fi
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d "${TMPDIR:-/tmp}/shellq-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "debootstrap $suite from $mirror (a few minutes) ..."
debootstrap --variant=minbase --include=python3,python3-venv,git,procps,ca-certificates "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
}
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root.log"
tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$tag" >/dev/null
echo "base image $tag built ($(docker run --rm "$tag" python3 --version))"
