#!/usr/bin/env bash
# Builds (or reuses) localhost/zeus-bookworm-systemd: Debian bookworm with systemd as PID 1,
# the base of the lab hosts and the Molecule hosts. No registry is reachable, so the root file
# system comes from debootstrap; its zstd tarball is cached under .lab/cache/ keyed on a hash of
# this script and of the controller files copied in, so a re-run costs seconds, not minutes.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
image=${ZEUS_IMAGE:-localhost/zeus-bookworm-systemd}
cache_dir=$repo_root/.lab/cache
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo_root/molecule/resources/containers.conf}

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root: the hosts are rootful podman containers (systemd inside needs it here)"
for tool in podman debootstrap zstd sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing; install it with 'make system-deps'"
done

# apt sources that are switched on: *.list and *.sources only (apt ignores other suffixes).
active_apt_sources=()
[[ -s /etc/apt/sources.list ]] && active_apt_sources+=(/etc/apt/sources.list)
for source in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $source ]] && active_apt_sources+=("$source")
done
# Acquire:: settings (proxies, snapshot mirrors without Valid-Until) are what apt needs to reach
# the same mirrors as the controller; other apt.conf.d snippets belong to the controller only.
apt_acquire_confs=()
for conf in /etc/apt/apt.conf.d/*; do
    [[ -f $conf ]] && grep -q '^[[:space:]]*Acquire::' "$conf" && apt_acquire_confs+=("$conf")
done
extra_ca_certs=(/usr/local/share/ca-certificates/*.crt)
[[ -e ${extra_ca_certs[0]} ]] || extra_ca_certs=()

image_hash=$(cat "${BASH_SOURCE[0]}" "${active_apt_sources[@]}" "${apt_acquire_confs[@]}" "${extra_ca_certs[@]}" \
    | sha256sum | cut -c1-16)
tarball=$cache_dir/zeus-bookworm-systemd-$image_hash.tar.zst

if [[ $(podman image inspect --format '{{ index .Labels "zeus.image-hash" }}' "$image" 2>/dev/null) == "$image_hash" ]]; then
    log "reusing $image ($image_hash)"
    exit 0
fi

import_tarball() {
    local previous_image_id
    previous_image_id=$(podman image inspect --format '{{ .Id }}' "$image" 2>/dev/null || true)
    log "importing $tarball as $image"
    zstd -dc "$tarball" | podman import --quiet \
        --change 'CMD ["/lib/systemd/systemd"]' \
        --change 'STOPSIGNAL SIGRTMIN+3' \
        --change 'ENV container=podman' \
        --change "LABEL zeus.image-hash=$image_hash" \
        - "$image" >/dev/null
    # The import took the name; the old image is only kept while containers still use it.
    [[ -n $previous_image_id ]] && podman rmi "$previous_image_id" >/dev/null 2>&1 || true
}

if [[ -f $tarball ]]; then
    import_tarball
    exit 0
fi

mkdir -p "$cache_dir"
work_dir=$(mktemp -d /var/tmp/zeus-rootfs.XXXXXX)
trap 'rm -rf "$work_dir"' EXIT
rootfs=$work_dir/rootfs
started=$(date +%s)
log "debootstrap bookworm into $rootfs (about 90 s from cold)"
# No mirror argument: debootstrap's default is the one the controller's apt reaches, and the
# image then gets the controller's own sources, so no mirror name is written into the project.
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,python3-apt,iproute2,procps,ca-certificates,sudo,curl \
    bookworm "$rootfs" >"$work_dir/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work_dir/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

if ((${#active_apt_sources[@]})); then
    rm -f "$rootfs"/etc/apt/sources.list "$rootfs"/etc/apt/sources.list.d/*
    for source in "${active_apt_sources[@]}"; do
        cp "$source" "$rootfs$source"
        # A source signed by a keyring the image lacks would break every apt-get update.
        while read -r keyring; do
            [[ -f $keyring && ! -e $rootfs$keyring ]] && install -D -m 0644 "$keyring" "$rootfs$keyring"
        done < <(grep -oE '(Signed-By:|signed-by=)[[:space:]]*/[^] ]+' "$source" | sed -E 's/^(Signed-By:|signed-by=)[[:space:]]*//')
    done
fi
for conf in "${apt_acquire_confs[@]}"; do
    cp "$conf" "$rootfs$conf"
done
if ((${#extra_ca_certs[@]})); then
    # HTTPS from inside the hosts (pip, curl) goes through the same interception as the controller.
    cp "${extra_ca_certs[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the image"
fi

# Units that manage hardware or kernel state a container does not own fail at boot and leave
# systemd "degraded"; masking them lets `systemctl is-system-running` say "running".
masked_units=(
    systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket
    systemd-udev-trigger.service systemd-udev-settle.service
    getty.target getty@.service console-getty.service serial-getty@.service
    systemd-remount-fs.service systemd-modules-load.service systemd-sysctl.service
    sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount
    sys-fs-fuse-connections.mount dev-hugepages.mount dev-mqueue.mount
    proc-sys-fs-binfmt_misc.automount systemd-binfmt.service
    systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer
)
for unit in "${masked_units[@]}"; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
# Empty machine-id: systemd gives each container its own at boot instead of sharing one.
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# The lists are empty: an old mtime makes apt's cache_valid_time refresh them on first use.
touch -d @0 "$rootfs/var/lib/apt/lists"

log "compressing into $tarball"
tar -C "$rootfs" --numeric-owner -c . | zstd -q -T0 -3 -o "$tarball.partial"
mv "$tarball.partial" "$tarball"
# Older tarballs were built by other versions of this script or other controller files.
find "$cache_dir" -maxdepth 1 -name 'zeus-bookworm-systemd-*.tar.zst' ! -name "${tarball##*/}" -delete
import_tarball
log "built $image in $(($(date +%s) - started)) s"
