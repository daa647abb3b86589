#!/usr/bin/env bash
# Builds target/debian/clusterd_<version>_<arch>.deb with cargo-deb and checks
# that it holds both binaries, the systemd unit, the example config, the man
# pages and shell completions (generated from the binaries just built), and
# the postinst that never starts an unconfigured node; then runs lintian on
# it, which must report no error and no warning.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
head -n1 packaging/debian/changelog | grep -q "^clusterd (${version}-" || {
  echo "packaging/debian/changelog: its latest entry is not version ${version} of Cargo.toml; add an entry for ${version}-1 at the top" >&2; exit 1; }
cargo build --release --bins
generated="$CARGO_TARGET_DIR/release/generated"
rm -rf "$generated"
mkdir -p "$generated/completions"
"$CARGO_TARGET_DIR/release/clusterctl" man --out "$generated/man"
# cargo-deb compresses man pages only when they are not build products;
# these are, so compress them as Debian policy wants (-n: reproducible).
gzip -9n "$generated"/man/*
"$CARGO_TARGET_DIR/release/clusterctl" completions bash > "$generated/completions/clusterctl"
"$CARGO_TARGET_DIR/release/clusterctl" completions zsh > "$generated/completions/_clusterctl"
"$CARGO_TARGET_DIR/release/clusterctl" completions fish > "$generated/completions/clusterctl.fish"
cargo deb --no-build
deb=$(ls -t "$CARGO_TARGET_DIR"/debian/clusterd_*.deb | head -n1)
contents=$(dpkg-deb -c "$deb")
for f in ./usr/bin/clusterd ./usr/bin/clusterctl ./usr/share/doc/clusterd/examples/clusterd.toml \
  ./usr/share/man/man8/clusterd.8.gz ./usr/share/man/man8/clusterctl.8.gz ./usr/share/man/man8/clusterctl-status.8.gz \
  ./usr/share/man/man5/clusterd.toml.5.gz ./usr/share/bash-completion/completions/clusterctl \
  ./usr/share/zsh/vendor-completions/_clusterctl ./usr/share/fish/vendor_completions.d/clusterctl.fish; do
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
if ! command -v lintian >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lintian >/dev/null
  else
    echo "lintian is not installed and this is not root: apt-get install lintian, then run $0 again" >&2; exit 1
  fi
fi
# Any error or warning fails the build; what is overridden is in
# packaging/debian/lintian-overrides (installed in the package), each with
# its reason.
lintian --fail-on error,warning "$deb"
echo "built and checked $deb (lintian: no errors or warnings)"
