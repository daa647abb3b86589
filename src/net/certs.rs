//! Cluster PKI bootstrap: owns `clusterctl certs init`, i.e. creating (or
//! reusing) the cluster CA and issuing one certificate per node id.
//!
//! A node's identity is the DNS SAN `node-<id>` in its certificate
//! ([`node_dns_name`](crate::core::names::node_dns_name)); `crate::net::tls` enforces that binding on every peer link.
//! Addresses are deliberately not put in certificates: peers may be reached
//! through NAT or proxies, so an address says nothing about who is speaking.
//!
//! Files written here follow the same rules as synced files (temp file in the
//! same directory, fsync, rename, fsync of the directory), and private keys are
//! created 0600 from the first byte on.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::core::names::node_dns_name;

/// Common name of the cluster CA certificate.
pub const CA_COMMON_NAME: &str = "clusterd cluster CA";
/// Lifetime of a newly created cluster CA.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Default lifetime of node certificates (`clusterctl certs init --days`).
pub const DEFAULT_NODE_VALIDITY_DAYS: u32 = 825;
/// File name of the CA certificate inside the output directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside the output directory.
pub const CA_KEY_FILE: &str = "ca.key";

// Nodes' clocks drift; a certificate that becomes valid "now" on the issuing
// host would be rejected for a while by a peer whose clock is a bit behind.
const BACKDATE: Duration = Duration::hours(1);

/// Path of node `id`'s certificate inside `dir`.
pub fn node_cert_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}.crt"))
}

/// Path of node `id`'s private key inside `dir`.
pub fn node_key_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}.key"))
}

/// What [`init_certs`] did, for the CLI to print.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertsReport {
    /// Files created by this run, in the order they were written.
    pub written: Vec<PathBuf>,
    /// Files that already existed and were left untouched (a reused CA, existing node certificates).
    pub kept: Vec<PathBuf>,
}

/// Why `clusterctl certs init` could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no node ids given; pass them as --nodes 1,2,3")]
    NoNodes,
    #[error("node id 0 is not allowed; node ids must be > 0 (fix --nodes)")]
    ZeroId,
    #[error("node id {0} is listed more than once; list every node once in --nodes")]
    DuplicateId(u64),
    #[error("certificate validity must be at least 1 day; pass a positive --days")]
    ZeroValidity,
    #[error("{path} exists but is not a directory; choose another --out")]
    NotADirectory { path: PathBuf },
    #[error("cannot create directory {path}: {source}; check the parent directory's permissions or choose another --out")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}; check its permissions")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}; check free space and the directory's permissions")]
    Write { path: PathBuf, source: io::Error },
    #[error("{present} exists but {missing} is missing; restore {missing}, or move {present} away to create a new CA (which requires re-issuing every node certificate)")]
    CaIncomplete { present: PathBuf, missing: PathBuf },
    #[error("{present} exists but {missing} is missing; restore {missing}, or move {present} away to have both re-issued")]
    NodeIncomplete { present: PathBuf, missing: PathBuf },
    #[error("{path} is not a usable CA certificate: {reason}; restore the original ca.crt or start over in an empty directory")]
    BadCaCert { path: PathBuf, reason: String },
    #[error("{path} is not a usable CA private key: {reason}; restore the original ca.key or start over in an empty directory")]
    BadCaKey { path: PathBuf, reason: String },
    #[error("CA key {key} does not belong to CA certificate {cert}; put the matching pair back or start over in an empty directory")]
    CaKeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("CA certificate {path} expired on {date}; create a new CA in an empty directory and re-issue every node certificate")]
    CaExpired { path: PathBuf, date: String },
    #[error("{cert} exists but there is no CA in {dir} to check it against; move the node files away, or restore ca.crt and ca.key")]
    OrphanNodeCert { cert: PathBuf, dir: PathBuf },
    #[error("existing {cert} is not a valid certificate for node {id} under CA {ca}: {reason}; move {cert} and its key away to have them re-issued")]
    BadExistingNodeCert {
        cert: PathBuf,
        id: u64,
        ca: PathBuf,
        reason: String,
    },
    #[error("cannot generate {what}: {reason}")]
    Generate { what: String, reason: String },
    #[error("admin name {0:?} is not usable; use 1 to 32 lowercase letters, digits and '-' (e.g. --name alice)")]
    BadAdminName(String),
    #[error("there is no CA in {dir} (ca.crt and ca.key); run `clusterctl certs admin` in the directory where `clusterctl certs init` made the CA")]
    NoCa { dir: PathBuf },
    #[error("{path} already exists; move it and its key away to issue a new admin certificate")]
    AdminExists { path: PathBuf },
}

/// Creates (or reuses) the cluster CA in `out` and issues a certificate and
/// key for every id in `node_ids` that does not have one yet.
///
/// Everything is checked before the first file is written, so a refused run
/// leaves `out` as it was.
pub fn init_certs(
    out: &Path,
    node_ids: &[u64],
    validity_days: u32,
) -> Result<CertsReport, CertError> {
    validate_ids(node_ids)?;
    if validity_days == 0 {
        return Err(CertError::ZeroValidity);
    }
    ensure_dir(out)?;

    let ca_cert_path = out.join(CA_CERT_FILE);
    let ca_key_path = out.join(CA_KEY_FILE);

    // Node files that already exist are kept, but only if they really are node
    // certificates of this CA: keeping a stale one would make the printed
    // report lie and the node fail later at its first handshake.
    let mut existing_nodes = Vec::new();
    let mut new_nodes = Vec::new();
    for &id in node_ids {
        let (crt, key) = (node_cert_path(out, id), node_key_path(out, id));
        let incomplete = |present, missing| CertError::NodeIncomplete { present, missing };
        match pair_exists(&crt, &key, incomplete)? {
            true => existing_nodes.push(id),
            false => new_nodes.push(id),
        }
    }
    let incomplete = |present, missing| CertError::CaIncomplete { present, missing };
    let ca_exists = pair_exists(&ca_cert_path, &ca_key_path, incomplete)?;

    let mut report = CertsReport::default();
    let now = OffsetDateTime::now_utc();

    let ca = match ca_exists {
        true => {
            let ca = load_ca(&ca_cert_path, &ca_key_path, now)?;
            report.kept.push(ca_cert_path.clone());
            report.kept.push(ca_key_path.clone());
            Some(ca)
        }
        false => {
            if let Some(&id) = existing_nodes.first() {
                return Err(CertError::OrphanNodeCert {
                    cert: node_cert_path(out, id),
                    dir: out.to_path_buf(),
                });
            }
            None
        }
    };

    if let Some(ca) = &ca {
        for &id in &existing_nodes {
            check_existing_node(out, id, &ca_cert_path, &ca.roots)?;
            report.kept.push(node_cert_path(out, id));
            report.kept.push(node_key_path(out, id));
        }
    }

    let ca = match ca {
        Some(ca) => ca,
        None => {
            let ca = new_ca(now)?;
            // Key first: a crash between the two writes then leaves ca.key
            // without ca.crt, which the next run reports instead of silently
            // minting a CA whose key was never saved.
            write_atomic(&ca_key_path, ca.key_pem.as_bytes(), FileKind::PrivateKey)?;
            report.written.push(ca_key_path.clone());
            write_atomic(&ca_cert_path, ca.cert_pem.as_bytes(), FileKind::Certificate)?;
            report.written.push(ca_cert_path.clone());
            ca
        }
    };

    for id in new_nodes {
        let (cert_pem, key_pem) = issue_node(&ca, id, validity_days, now)?;
        let (crt, key) = (node_cert_path(out, id), node_key_path(out, id));
        write_atomic(&key, key_pem.as_bytes(), FileKind::PrivateKey)?;
        report.written.push(key);
        write_atomic(&crt, cert_pem.as_bytes(), FileKind::Certificate)?;
        report.written.push(crt);
    }
    Ok(report)
}

fn validate_ids(ids: &[u64]) -> Result<(), CertError> {
    if ids.is_empty() {
        return Err(CertError::NoNodes);
    }
    let mut seen = HashSet::new();
    for &id in ids {
        if id == 0 {
            return Err(CertError::ZeroId);
        }
        if !seen.insert(id) {
            return Err(CertError::DuplicateId(id));
        }
    }
    Ok(())
}

fn ensure_dir(dir: &Path) -> Result<(), CertError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(CertError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertError::CreateDir {
                path: dir.to_path_buf(),
                source,
            }),
        Err(source) => Err(CertError::Read {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Whether both files of a certificate and its key exist (`true`) or
/// neither does (`false`); when only one does, the error `incomplete` makes
/// of the one present and the one missing.
fn pair_exists(
    cert: &Path,
    key: &Path,
    incomplete: impl Fn(PathBuf, PathBuf) -> CertError,
) -> Result<bool, CertError> {
    match (exists(cert)?, exists(key)?) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(incomplete(cert.to_path_buf(), key.to_path_buf())),
        (false, true) => Err(incomplete(key.to_path_buf(), cert.to_path_buf())),
    }
}

fn exists(path: &Path) -> Result<bool, CertError> {
    // symlink_metadata: a dangling symlink is still "something is there" and
    // must not be overwritten by a fresh file.
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CertError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A CA able to sign node certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
    roots: Arc<rustls::RootCertStore>,
    cert_pem: String,
    key_pem: String,
}

fn new_ca(now: OffsetDateTime) -> Result<Ca, CertError> {
    let generate = |reason: rcgen::Error| CertError::Generate {
        what: "the cluster CA".into(),
        reason: reason.to_string(),
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    // Path length 0: the cluster CA signs node certificates directly and
    // nothing else, so a leaked node key can never act as an intermediate.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(i64::from(CA_VALIDITY_DAYS));
    let cert = params.self_signed(&key).map_err(generate)?;
    let roots = roots_from_der(cert.der().clone()).map_err(|reason| CertError::Generate {
        what: "the cluster CA".into(),
        reason,
    })?;
    let not_after = params.not_after;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
        not_after,
        roots,
    })
}

fn load_ca(cert_path: &Path, key_path: &Path, now: OffsetDateTime) -> Result<Ca, CertError> {
    let cert_pem = fs::read_to_string(cert_path).map_err(|source| CertError::Read {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let key_pem = fs::read_to_string(key_path).map_err(|source| CertError::Read {
        path: key_path.to_path_buf(),
        source,
    })?;
    let bad_cert = |reason: String| CertError::BadCaCert {
        path: cert_path.to_path_buf(),
        reason,
    };

    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| bad_cert(format!("no PEM certificate found ({e})")))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| bad_cert(format!("not valid X.509 ({e})")))?;
    match x509.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Err(bad_cert(
                "it is not a CA certificate (basicConstraints CA is not set)".into(),
            ))
        }
        Err(e) => {
            return Err(bad_cert(format!(
                "its basicConstraints extension is malformed ({e})"
            )))
        }
    }
    let not_after = x509.validity().not_after.to_datetime();
    if not_after <= now {
        return Err(CertError::CaExpired {
            path: cert_path.to_path_buf(),
            date: ymd(not_after),
        });
    }

    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadCaKey {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // rcgen signs with whatever key it is handed; a mismatched pair would
    // yield node certificates that no peer can verify.
    if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
        return Err(CertError::CaKeyMismatch {
            key: key_path.to_path_buf(),
            cert: cert_path.to_path_buf(),
        });
    }
    let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad_cert(e.to_string()))?;
    let roots = roots_from_der(der.clone().into_owned()).map_err(bad_cert)?;
    Ok(Ca {
        issuer,
        not_after,
        roots,
        cert_pem,
        key_pem,
    })
}

fn roots_from_der(der: CertificateDer<'static>) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).map_err(|e| e.to_string())?;
    Ok(Arc::new(roots))
}

fn check_existing_node(
    dir: &Path,
    id: u64,
    ca_path: &Path,
    roots: &Arc<rustls::RootCertStore>,
) -> Result<(), CertError> {
    let path = node_cert_path(dir, id);
    let pem = fs::read(&path).map_err(|source| CertError::Read {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: String| CertError::BadExistingNodeCert {
        cert: path.clone(),
        id,
        ca: ca_path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("unreadable PEM ({e})")))?;
    if chain.is_empty() {
        return Err(bad("it contains no PEM certificate".into()));
    }
    crate::net::tls::check_node_cert(roots, &chain, id).map_err(|p| bad(p.to_string()))
}

fn issue_node(
    ca: &Ca,
    id: u64,
    validity_days: u32,
    now: OffsetDateTime,
) -> Result<(String, String), CertError> {
    issue_leaf(
        ca,
        &node_dns_name(id),
        &format!("clusterd node {id}"),
        validity_days,
        now,
    )
}

/// Issues an administrator's certificate `admin-<name>.crt`/`.key` in `out`
/// under the CA there: it lets `clusterctl --remote` call every admin RPC on
/// a node's `[admin] listen` port. Refuses to overwrite an existing one.
pub fn issue_admin(out: &Path, name: &str, validity_days: u32) -> Result<CertsReport, CertError> {
    if !crate::core::names::valid_admin_name(name) {
        return Err(CertError::BadAdminName(name.to_string()));
    }
    if validity_days == 0 {
        return Err(CertError::ZeroValidity);
    }
    let (ca_cert_path, ca_key_path) = (out.join(CA_CERT_FILE), out.join(CA_KEY_FILE));
    if !(exists(&ca_cert_path)? && exists(&ca_key_path)?) {
        return Err(CertError::NoCa {
            dir: out.to_path_buf(),
        });
    }
    let crt = out.join(format!("admin-{name}.crt"));
    let key = out.join(format!("admin-{name}.key"));
    for p in [&crt, &key] {
        if exists(p)? {
            return Err(CertError::AdminExists { path: p.clone() });
        }
    }
    let now = OffsetDateTime::now_utc();
    let ca = load_ca(&ca_cert_path, &ca_key_path, now)?;
    let (cert_pem, key_pem) = issue_leaf(
        &ca,
        &crate::core::names::admin_dns_name(name),
        &format!("clusterd admin {name}"),
        validity_days,
        now,
    )?;
    write_atomic(&key, key_pem.as_bytes(), FileKind::PrivateKey)?;
    write_atomic(&crt, cert_pem.as_bytes(), FileKind::Certificate)?;
    Ok(CertsReport {
        written: vec![key, crt],
        kept: vec![ca_cert_path],
    })
}

/// A leaf certificate for both TLS roles with the single identity SAN `dns`.
fn issue_leaf(
    ca: &Ca,
    dns: &str,
    common_name: &str,
    validity_days: u32,
    now: OffsetDateTime,
) -> Result<(String, String), CertError> {
    let generate = |reason: String| CertError::Generate {
        what: format!("the certificate for {dns}"),
        reason,
    };
    let key = KeyPair::generate().map_err(|e| generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let name = dns
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| generate(e.to_string()))?;
    params.subject_alt_names = vec![SanType::DnsName(name)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    // A certificate cannot be trusted past its issuer's expiry anyway; capping
    // keeps the printed validity honest when an old CA is reused, and a huge
    // --days (overflowing the calendar) simply means "as long as the CA".
    let wanted = now.checked_add(Duration::days(i64::from(validity_days)));
    params.not_after = wanted.map_or(ca.not_after, |t| t.min(ca.not_after));
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|e| generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ymd(t: OffsetDateTime) -> String {
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

#[derive(Clone, Copy)]
enum FileKind {
    PrivateKey,
    Certificate,
}

/// Writes `contents` to `path` so that a crash leaves either no file or the
/// complete file, never a truncated key or certificate.
fn write_atomic(path: &Path, contents: &[u8], kind: FileKind) -> Result<(), CertError> {
    let write_err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        nanos
    ));
    let mode = match kind {
        FileKind::PrivateKey => 0o600,
        FileKind::Certificate => 0o644,
    };

    let result = (|| -> io::Result<()> {
        // create_new + mode: the key is never readable by others, not even
        // for the instant a chmod-after-create would leave open.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        if let FileKind::Certificate = kind {
            // Certificates are public and other local tools read them; do not
            // let a restrictive umask make them unreadable.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn dns_name_format() {
        assert_eq!(node_dns_name(7), "node-7");
    }

    #[test]
    fn writes_expected_files_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pki");
        let report = init_certs(&out, &[1, 2, 3], 825).unwrap();
        assert_eq!(mode(&out), 0o700);
        let mut names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ca.crt",
                "ca.key",
                "node-1.crt",
                "node-1.key",
                "node-2.crt",
                "node-2.key",
                "node-3.crt",
                "node-3.key"
            ]
        );
        assert_eq!(report.written.len(), 8);
        assert!(report.kept.is_empty());
        for name in &names {
            let p = out.join(name);
            let want = if name.ends_with(".key") { 0o600 } else { 0o644 };
            assert_eq!(mode(&p), want, "{name}");
        }
        let ca = fs::read(out.join("ca.crt")).unwrap();
        let ca = CertificateDer::from_pem_slice(&ca).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        assert!(ca.is_ca());
        assert_eq!(
            ca.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            CA_COMMON_NAME
        );
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());

        let leaf = fs::read(out.join("node-2.crt")).unwrap();
        let leaf = CertificateDer::from_pem_slice(&leaf).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert!(!x.is_ca());
        assert_eq!(
            x.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "clusterd node 2"
        );
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(x.key_usage().unwrap().unwrap().value.digital_signature());
        let days =
            (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86400;
        assert_eq!(days, 825); // 825 days plus the one-hour backdate, rounded down
        assert_eq!(crate::net::tls::node_id_from_cert(&leaf).unwrap(), 2);
        // no temp files left behind
        assert!(!names.iter().any(|n| n.starts_with('.')));
    }

    #[test]
    fn rerun_keeps_files_and_reuses_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        init_certs(out, &[1, 2], 825).unwrap();
        let ca_before = fs::read(out.join("ca.crt")).unwrap();
        let n1_before = fs::read(out.join("node-1.crt")).unwrap();
        let k1_before = fs::read(out.join("node-1.key")).unwrap();

        let report = init_certs(out, &[1, 2, 3], 30).unwrap();
        assert_eq!(fs::read(out.join("ca.crt")).unwrap(), ca_before);
        assert_eq!(fs::read(out.join("node-1.crt")).unwrap(), n1_before);
        assert_eq!(fs::read(out.join("node-1.key")).unwrap(), k1_before);
        assert_eq!(
            report.written,
            vec![out.join("node-3.key"), out.join("node-3.crt")]
        );
        for f in [
            "ca.crt",
            "ca.key",
            "node-1.crt",
            "node-1.key",
            "node-2.crt",
            "node-2.key",
        ] {
            assert!(report.kept.contains(&out.join(f)), "{f} not reported kept");
        }
        // The new certificate verifies against the original CA.
        let ca_der = CertificateDer::from_pem_slice(&ca_before).unwrap();
        let roots = roots_from_der(ca_der).unwrap();
        let n3 =
            CertificateDer::from_pem_slice(&fs::read(out.join("node-3.crt")).unwrap()).unwrap();
        crate::net::tls::check_node_cert(&roots, &[n3], 3).unwrap();
        assert_eq!(mode(&out.join("node-3.key")), 0o600);
    }

    #[test]
    fn huge_validity_is_capped_at_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        init_certs(tmp.path(), &[1], u32::MAX).unwrap();
        let read = |name: &str| {
            let pem = fs::read(tmp.path().join(name)).unwrap();
            let der = CertificateDer::from_pem_slice(&pem).unwrap();
            let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
            x.validity().not_after.timestamp()
        };
        assert_eq!(read("node-1.crt"), read("ca.crt"));
    }

    #[test]
    fn rejects_bad_ids() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            init_certs(tmp.path(), &[1, 0], 825),
            Err(CertError::ZeroId)
        ));
        assert!(matches!(
            init_certs(tmp.path(), &[1, 2, 1], 825),
            Err(CertError::DuplicateId(1))
        ));
        assert!(matches!(
            init_certs(tmp.path(), &[], 825),
            Err(CertError::NoNodes)
        ));
        assert!(matches!(
            init_certs(tmp.path(), &[1], 0),
            Err(CertError::ZeroValidity)
        ));
        // Refused runs write nothing.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn half_a_ca_is_an_error_naming_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        init_certs(tmp.path(), &[1], 825).unwrap();
        fs::remove_file(tmp.path().join("ca.crt")).unwrap();
        let err = init_certs(tmp.path(), &[2], 825).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CertError::CaIncomplete { .. }), "{msg}");
        assert!(msg.contains("ca.crt is missing"), "{msg}");
        assert!(!tmp.path().join("node-2.crt").exists());
    }

    #[test]
    fn half_a_node_pair_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        init_certs(tmp.path(), &[1], 825).unwrap();
        fs::remove_file(tmp.path().join("node-1.key")).unwrap();
        let msg = init_certs(tmp.path(), &[1], 825).unwrap_err().to_string();
        assert!(msg.contains("node-1.key is missing"), "{msg}");
    }

    #[test]
    fn mismatched_ca_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_certs(a.path(), &[1], 825).unwrap();
        init_certs(b.path(), &[1], 825).unwrap();
        fs::copy(b.path().join("ca.key"), a.path().join("ca.key")).unwrap();
        let err = init_certs(a.path(), &[2], 825).unwrap_err();
        assert!(matches!(err, CertError::CaKeyMismatch { .. }), "{err}");
    }

    #[test]
    fn node_cert_from_other_ca_is_not_kept_silently() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_certs(a.path(), &[1], 825).unwrap();
        init_certs(b.path(), &[1], 825).unwrap();
        fs::copy(b.path().join("node-1.crt"), a.path().join("node-1.crt")).unwrap();
        let err = init_certs(a.path(), &[1, 2], 825).unwrap_err();
        assert!(
            matches!(err, CertError::BadExistingNodeCert { id: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn out_path_that_is_a_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("file");
        fs::write(&f, b"x").unwrap();
        assert!(matches!(
            init_certs(&f, &[1], 825),
            Err(CertError::NotADirectory { .. })
        ));
    }
}
