#!/usr/bin/env bash
# A Debian 12 / Python 3.11 base image made from a debootstrap rootfs and `docker import`ed,
# for machines that cannot pull python:3.11-slim-bookworm (no Docker Hub). It holds what the
# Dockerfile asks of its BASE_IMAGE: python3 (3.11) with venv and its shared library (the
# Triton Python stub links libpython3.11), and the CA certificates the host trusts, so pip
# and apt inside builds pass a TLS-inspecting proxy as the host does.
#
#   docker/base-image.sh [TAG]      (root; needs debootstrap; default TAG wsss-base:bookworm)
#
# Skips the work when TAG exists; FORCE=1 rebuilds. Uses $DOCKER (default: docker), so
# DOCKER_HOST picks the engine.
set -euo pipefail

TAG=${1:-wsss-base:bookworm}
DOCKER=${DOCKER:-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${FORCE:-0}" != 1 ] && $DOCKER image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG exists (FORCE=1 rebuilds)"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "install debootstrap" >&2; exit 1; }

rootfs=$(mktemp -d /var/tmp/wsss-rootfs.XXXXXX)
trap 'rm -rf --one-file-system "$rootfs"' EXIT

debootstrap --variant=minbase \
    --include=python3,python3-venv,libpython3.11,libexpat1,ca-certificates \
    bookworm "$rootfs" "$MIRROR"

cat > "$rootfs/etc/apt/sources.list" <<LIST
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
LIST
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates --fresh >/dev/null
fi
# No apt lists, caches or logs in the layer.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
    "$rootfs"/tmp/* "$rootfs"/root/.cache

tar --numeric-owner -C "$rootfs" -c . \
    | $DOCKER import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$TAG"
$DOCKER image inspect --format '{{.Size}}' "$TAG" | awk -v t="$TAG" '{printf "%s: %.0f MB\n", t, $1/1e6}'
