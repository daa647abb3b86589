//! Certificate names: how a node (`node-<id>`) and an administrator
//! (`admin-<name>`) are spelled in a certificate's DNS SAN, and how a serial
//! number is spelled in `tls.revoked_serials`. The one place that issues
//! names (`net::certs`) and the one that checks them (`net::tls`) share it.
//!
//! Invariant owned here: each identity has exactly one spelling, so a name
//! that passes one check can never mean another identity in another.

/// The identity SAN every node certificate carries: `node-<id>`.
pub fn node_dns_name(id: u64) -> String {
    format!("node-{id}")
}

/// Accepts exactly `node-<digits>` in canonical form (no sign, no leading
/// zero, id > 0), so that one id has one spelling and "node-01" cannot pass
/// for node 1 in one check and fail in another.
pub fn parse_node_dns_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("node-")?;
    let id: u64 = digits.parse().ok()?;
    (id > 0 && id.to_string() == digits).then_some(id)
}

/// The identity SAN of an administrator's certificate: `admin-<name>`.
pub fn admin_dns_name(name: &str) -> String {
    format!("admin-{name}")
}

/// A usable admin name: 1 to 32 lowercase letters, digits and '-', not
/// starting with '-' (so `admin-<name>` is a valid DNS name).
pub fn valid_admin_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn parse_admin_dns_name(dns: &str) -> Option<&str> {
    dns.strip_prefix("admin-").filter(|n| valid_admin_name(n))
}

/// Normalizes a serial as people write it ("0A:1B", "0x0a1b", "a1b") to "a1b";
/// `None` if it is not hexadecimal.
pub fn normalize_serial(text: &str) -> Option<String> {
    let hex: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = hex.trim_start_matches('0');
    Some(if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    })
}
