#!/usr/bin/env bash
# After `vagrant up control`: fetch the control plane's CA bundle and a one-time join token
# per node into .cache/join/, which `vagrant up node1 node2` hands to the nodes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
join="${DABBA_CACHE:-$here/.cache}/join"
mkdir -p "$join"
vagrant ssh control -c "sudo cat /var/lib/dabba/control/ca/bundle.pem" 2>/dev/null | tr -d '\r' >"$join/ca.pem"
grep -q "BEGIN CERTIFICATE" "$join/ca.pem" || { echo "join: no CA bundle from the control VM" >&2; exit 1; }
for n in node1 node2; do
	vagrant ssh control -c "sudo dabba control token create --node $n --ttl 1h" 2>/dev/null |
		tr -d '\r' >"$join/$n.token"
	[ -s "$join/$n.token" ] || { echo "join: no token for $n" >&2; exit 1; }
done
echo "join: CA bundle and tokens for node1, node2 in $join"
