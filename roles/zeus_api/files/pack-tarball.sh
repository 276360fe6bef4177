#!/usr/bin/env bash
# pack-tarball.sh OUTPUT TAR-ARGUMENTS...   e.g. pack-tarball.sh out.tar -C /abs/dir . -C /abs/other file
# Builds a reproducible tar (sorted names, fixed dates, owners and modes, files readable by
# everyone), so the same inputs give the same bytes and checksum. OUTPUT is replaced atomically
# and only when the bytes differ: a concurrent run copying it never reads a half-written file.
set -euo pipefail
output=$1
shift
mkdir -p "$(dirname "$output")"
temporary=$(mktemp "$output.XXXXXX")
trap 'rm -f "$temporary"' EXIT
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=go+rX,go-w \
    -cf "$temporary" "$@"
if ! cmp -s "$temporary" "$output"; then
    chmod 0644 "$temporary"
    mv -f "$temporary" "$output"
fi
