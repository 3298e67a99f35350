#!/usr/bin/env bash
# A Python base image made locally, for building the images where no registry is reachable (the
# test tests/docker/… and CI machines without Docker Hub): Debian bookworm (debootstrap) with
# python3 + venv, committed to buildah's local storage as localhost/tensortrace-base:bookworm.
# ~7 min, once. Needs root, buildah and debootstrap (apt-get install buildah debootstrap).
#   docker/local-base.sh && buildah build --pull=never --build-arg BASE_IMAGE=localhost/tensortrace-base:bookworm \
#       -f docker/exporter/Dockerfile -t tensortrace-exporter:dev .
set -euo pipefail
IMAGE=${1:-localhost/tensortrace-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then echo "$IMAGE exists"; exit 0; fi
work=$(mktemp -d /var/tmp/tt-base-XXXXXX)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$MIRROR"
rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*
ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
cp -a "$work/rootfs/." "$mnt/"
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
buildah commit --rm "$ctr" "$IMAGE"
echo "$IMAGE committed"
