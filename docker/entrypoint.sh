#!/bin/sh
# Writes this node's config from the environment unless one is mounted, makes
# certificates into the shared certs volume if none exist yet, then execs
# clusterd in the foreground (`entrypoint.sh --check` only validates).
#   NODE_ID     this node's id
#   PEERS       every member as id=host:port, e.g. 1=node1:7700,2=node2:7700,3=node3:7700
#   WITNESSES   ids of witness members (vote, hold no files, never lead), e.g. 3
#   SYNC_SETS   sync sets of the data nodes as name=path, comma-separated, e.g.
#               demo=/srv/clusterd-demo (witnesses get none); empty: none
# Optional: CONFIG_FILE, CERTS_DIR, DATA_DIR, ADMIN_SOCKET (paths).
set -eu
: "${NODE_ID:?set NODE_ID}"
: "${PEERS:?set PEERS, e.g. 1=node1:7700,2=node2:7700,3=node3:7700}"
WITNESSES="${WITNESSES:-}"
SYNC_SETS="${SYNC_SETS:-}"
conf="${CONFIG_FILE:-/etc/clusterd/clusterd.toml}"
certs="${CERTS_DIR:-/certs}"
is_witness() { echo ",$WITNESSES," | grep -q ",$1,"; }
if [ ! -f "$conf" ]; then
  ids=$(echo "$PEERS" | tr ',' '\n' | cut -d= -f1 | paste -sd, -)
  # Only the lowest id creates the CA, so every node trusts the same one.
  first=$(echo "$ids" | tr ',' '\n' | sort -n | head -n1)
  if [ "$NODE_ID" = "$first" ] && [ ! -f "$certs/ca.crt" ]; then
    clusterctl certs init --out "$certs" --nodes "$ids"
  fi
  # Each file is written atomically, a node's certificate after the CA's and
  # the node's key: once it is there, all three are.
  while [ ! -f "$certs/node-$NODE_ID.crt" ]; do sleep 0.2; done
  mkdir -p "$(dirname "$conf")"
  {
    printf '[node]\nid = %s\nlisten = "0.0.0.0:7700"\n' "$NODE_ID"
    printf 'data_dir = "%s"\nadmin_socket = "%s"\n' "${DATA_DIR:-/var/lib/clusterd}" "${ADMIN_SOCKET:-/run/clusterd/admin.sock}"
    if is_witness "$NODE_ID"; then printf 'witness = true\n'; fi
    printf '\n[tls]\nca = "%s/ca.crt"\ncert = "%s/node-%s.crt"\nkey = "%s/node-%s.key"\n' "$certs" "$certs" "$NODE_ID" "$certs" "$NODE_ID"
    echo "$PEERS" | tr ',' '\n' | while IFS== read -r id addr; do
      printf '\n[[peer]]\nid = %s\naddr = "%s"\n' "$id" "$addr"
      if is_witness "$id"; then printf 'witness = true\n'; fi
    done
    if ! is_witness "$NODE_ID"; then
      echo "$SYNC_SETS" | tr ',' '\n' | while IFS== read -r name path; do
        [ -n "$name" ] || continue
        printf '\n[[sync]]\nname = "%s"\npath = "%s"\n' "$name" "$path"
      done
    fi
  } > "$conf.tmp"
  mv "$conf.tmp" "$conf"
fi
if [ "${1:-}" = "--check" ]; then
  exec clusterd --config "$conf" --check
fi
exec clusterd --config "$conf"
