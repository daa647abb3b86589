#!/bin/sh
# Writes this node's config from NODE_ID and PEERS ("1=node1:7700,2=node2:7700,...")
# unless one is mounted, makes certificates into the shared /certs volume if
# none exist yet, then runs clusterd in the foreground.
set -eu
: "${NODE_ID:?set NODE_ID}"
: "${PEERS:?set PEERS, e.g. 1=node1:7700,2=node2:7700,3=node3:7700}"
conf=/etc/clusterd/clusterd.toml
if [ ! -f "$conf" ]; then
  ids=$(echo "$PEERS" | tr ',' '\n' | cut -d= -f1 | paste -sd, -)
  # Only node 1 creates the CA, so every node trusts the same one.
  if [ "$NODE_ID" = 1 ] && [ ! -f /certs/ca.crt ]; then
    clusterctl certs init --out /certs --nodes "$ids"
  fi
  while [ ! -f "/certs/node-$NODE_ID.key" ]; do sleep 0.5; done
  mkdir -p /etc/clusterd
  {
    printf '[node]\nid = %s\nlisten = "0.0.0.0:7700"\ndata_dir = "/var/lib/clusterd"\nadmin_socket = "/run/clusterd/admin.sock"\n\n' "$NODE_ID"
    printf '[tls]\nca = "/certs/ca.crt"\ncert = "/certs/node-%s.crt"\nkey = "/certs/node-%s.key"\n' "$NODE_ID" "$NODE_ID"
    echo "$PEERS" | tr ',' '\n' | while IFS== read -r id addr; do
      printf '\n[[peer]]\nid = %s\naddr = "%s"\n' "$id" "$addr"
    done
  } > "$conf"
fi
exec clusterd --config "$conf"
