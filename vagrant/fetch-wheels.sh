#!/usr/bin/env bash
# The project's wheel (dist/) and a wheelhouse of its pinned runtime dependencies
# (wheelhouse/), fetched on the host for VMs that reach no registry.
#   vagrant/fetch-wheels.sh [CACHE_DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${1:-$here/.cache}"
pip="$repo/.venv/bin/pip"
rm -rf "$cache/dist"
mkdir -p "$cache/dist" "$cache/wheelhouse"
"$pip" wheel -q --no-deps -w "$cache/dist" "$repo" 2>&1 | grep -v '^WARNING: Location' || true
ls "$cache/dist"/dabbawala-*.whl >/dev/null
# the runtime block of requirements.txt, as pinned
sed -n '/^# Runtime/,/^# Development/p' "$repo/requirements.txt" | grep -v '^#' >"$cache/runtime.txt"
stamp="$(sha256sum "$cache/runtime.txt" | cut -d' ' -f1)"
if [ "$(cat "$cache/wheelhouse/.stamp" 2>/dev/null)" != "$stamp" ]; then
	echo "fetch-wheels: pip download of the runtime dependencies into $cache/wheelhouse"
	"$pip" download -q -d "$cache/wheelhouse" -r "$cache/runtime.txt" 2>&1 | grep -v '^WARNING: Location' || true
	echo "$stamp" >"$cache/wheelhouse/.stamp"
fi
cp "$cache/dist"/dabbawala-*.whl "$cache/wheelhouse/"
echo "fetch-wheels: $(ls "$cache/dist"), $(ls "$cache/wheelhouse" | grep -c whl) wheels in the wheelhouse"
