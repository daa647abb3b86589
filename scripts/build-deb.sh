#!/usr/bin/env bash
# Builds target/debian/clusterd_<version>_<arch>.deb with cargo-deb and checks
# that it holds both binaries, the systemd unit, the example config and the
# postinst that never starts an unconfigured node.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
cargo deb
deb=$(ls -t "$CARGO_TARGET_DIR"/debian/clusterd_*.deb | head -n1)
contents=$(dpkg-deb -c "$deb")
for f in ./usr/bin/clusterd ./usr/bin/clusterctl ./usr/share/doc/clusterd/examples/clusterd.toml; do
  grep -q " $f\$" <<<"$contents" || { echo "$deb lacks $f" >&2; exit 1; }
done
grep -Eq ' \./(usr/)?lib/systemd/system/clusterd\.service$' <<<"$contents" || { echo "$deb lacks the systemd unit" >&2; exit 1; }
scripts=$(mktemp -d)
dpkg-deb -e "$deb" "$scripts"
grep -q 'install -d -m 0700 /etc/clusterd /var/lib/clusterd' "$scripts/postinst" || { echo "$deb: postinst does not create the private directories" >&2; exit 1; }
if grep -v '^[[:space:]]*echo' "$scripts/postinst" | grep -Eq 'systemctl (start|enable)|deb-systemd-invoke start'; then
  echo "$deb: postinst would start or enable an unconfigured node" >&2; exit 1
fi
rm -rf "$scripts"
echo "built and checked $deb"
