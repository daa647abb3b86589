//! Mutual TLS for peer links; owns invariant 5 (authenticated peers).
//!
//! Both ends of every peer connection present a certificate issued by the
//! cluster CA, and a peer's node id is the single `node-<id>` DNS SAN of its
//! certificate, never its network address (peers may sit behind NAT or
//! proxies). [`PeerTls`] holds the ready rustls configurations:
//! - the acceptor refuses clients without a CA-issued certificate naming
//!   exactly one node; the server learns who connected with [`peer_node_id`];
//! - the connector accepts a server only if its certificate chains to the CA
//!   and names exactly the node that was dialled (`ServerName` `node-<id>`).
//!
//! The ring provider is passed explicitly everywhere so nothing depends on a
//! process-wide default `CryptoProvider` being installed.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::core::config::TlsPaths;
use crate::core::names::{
    node_dns_name, normalize_serial, parse_admin_dns_name, parse_node_dns_name,
};

/// ALPN protocol spoken on peer links (gRPC over HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS material could not be loaded or a peer could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}; run `clusterctl certs init` or fix [tls] {key}")]
    Read {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{what} {path} is not valid PEM ({reason}); run `clusterctl certs init` or fix [tls] {key}"
    )]
    BadPem {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} contains no {kind}; run `clusterctl certs init` or fix [tls] {key}")]
    Empty {
        what: &'static str,
        key: &'static str,
        kind: &'static str,
        path: PathBuf,
    },
    #[error("CA certificate {path} is not usable as a trust anchor ({reason}); run `clusterctl certs init` or fix [tls] ca")]
    BadCa { path: PathBuf, reason: String },
    #[error("certificate {path} is for node {cert_id}, not for this node (id {own_id}); point [tls] cert and key at node-{own_id}.crt and node-{own_id}.key")]
    WrongNode {
        path: PathBuf,
        cert_id: u64,
        own_id: u64,
    },
    #[error("certificate {path} does not identify a node ({source}); issue node certificates with `clusterctl certs init`")]
    NoIdentity {
        path: PathBuf,
        source: Box<TlsError>,
    },
    #[error("certificate {path} is not valid under the cluster CA {ca}: {reason}; issue it with `clusterctl certs init --out DIR --nodes {own_id}` using that CA's directory, or fix [tls] ca")]
    NotFromCa {
        path: PathBuf,
        ca: PathBuf,
        own_id: u64,
        reason: String,
    },
    #[error("private key {key} does not belong to certificate {cert}; point [tls] key at the key issued with that certificate")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("private key {path} cannot be used ({reason}); run `clusterctl certs init` or fix [tls] key")]
    BadKey { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
    #[error("certificate is not valid X.509 ({0})")]
    BadCert(String),
    #[error("certificate carries no node-<id> DNS name (it names: {names})")]
    NoNodeName { names: String },
    #[error("certificate names several nodes ({names}); a node certificate must name exactly one")]
    SeveralNodeNames { names: String },
    #[error("peer presented no certificate; peers must use mutual TLS with a certificate from the cluster CA")]
    NoPeerCertificate,
    #[error("certificate names neither one admin (admin-<name>) nor one node (node-<id>) (it names: {names}); make an admin certificate with `clusterctl certs admin --out DIR --name NAME`")]
    NoAdminIdentity { names: String },
}

/// Who called the remote admin service, as its certificate proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCaller {
    /// An administrator's certificate (`admin-<name>`): every admin call.
    Admin(String),
    /// A node's certificate: read-only calls (status, conflicts), so a
    /// monitoring host can reuse one; never promote or barrier.
    Node(u64),
}

impl fmt::Display for AdminCaller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminCaller::Admin(name) => write!(f, "admin {name}"),
            AdminCaller::Node(id) => write!(f, "node {id}"),
        }
    }
}

fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCert(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCert(e.to_string()))?;
    Ok(san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
        .collect())
}

/// Who a (verified) admin-port client certificate speaks for: exactly one
/// identity SAN, `admin-<name>` or `node-<id>`.
pub fn admin_caller_from_cert(der: &CertificateDer<'_>) -> Result<AdminCaller, TlsError> {
    let names = dns_names(der)?;
    let mut callers: Vec<AdminCaller> = Vec::new();
    for dns in &names {
        let caller = if let Some(name) = parse_admin_dns_name(dns) {
            AdminCaller::Admin(name.to_string())
        } else if let Some(id) = parse_node_dns_name(dns) {
            AdminCaller::Node(id)
        } else {
            continue;
        };
        if !callers.contains(&caller) {
            callers.push(caller);
        }
    }
    match callers.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(TlsError::NoAdminIdentity {
            names: if names.is_empty() {
                "no DNS names".into()
            } else {
                names.join(", ")
            },
        }),
    }
}

/// Loaded TLS material of this node: ready acceptor and connector configs.
#[derive(Clone)]
pub struct PeerTls {
    own_id: u64,
    server: Arc<ServerConfig>,
    /// The remote admin port's: clients must hold an admin or node
    /// certificate of the cluster CA.
    admin_server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    not_after: SystemTime,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("own_id", &self.own_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads CA, own cert chain and key; checks the own certificate chains to
    /// the CA, is usable for both TLS roles, carries SAN `node-<own_id>` and
    /// matches the key. Every error names the file to fix.
    pub fn load(paths: &TlsPaths, own_id: u64) -> Result<PeerTls, TlsError> {
        let provider = provider();
        let roots = load_roots(&paths.ca)?;
        let chain = load_chain(&paths.cert, "certificate", "cert")?;
        let key = load_key(&paths.key)?;

        check_node_cert(&roots, &chain, own_id).map_err(|problem| match problem {
            NodeCertProblem::NoIdentity(e) => TlsError::NoIdentity {
                path: paths.cert.clone(),
                source: Box::new(e),
            },
            NodeCertProblem::WrongNode(cert_id) => TlsError::WrongNode {
                path: paths.cert.clone(),
                cert_id,
                own_id,
            },
            NodeCertProblem::Rejected(e) => TlsError::NotFromCa {
                path: paths.cert.clone(),
                ca: paths.ca.clone(),
                own_id,
                reason: describe_rejection(&e),
            },
        })?;

        // Checked here rather than left to the config builders so that the
        // error can name both files instead of rustls' generic message.
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    key: paths.key.clone(),
                    cert: paths.cert.clone(),
                },
                other => TlsError::BadKey {
                    path: paths.key.clone(),
                    reason: other.to_string(),
                },
            },
        )?;

        let not_after = not_after_of(&chain[0]).map_err(|reason| TlsError::BadPem {
            what: "certificate",
            key: "cert",
            path: paths.cert.clone(),
            reason,
        })?;

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::BadCa {
                    path: paths.ca.clone(),
                    reason: e.to_string(),
                })?;
        let mut admin_server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(Arc::new(IdentityClientVerifier {
                inner: client_verifier.clone(),
                identity: |der| admin_caller_from_cert(der).map(|_| ()),
            }))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        admin_server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(Arc::new(IdentityClientVerifier {
                inner: client_verifier,
                identity: |der| node_id_from_cert(der).map(|_| ()),
            }))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let client = node_client_config(paths, roots, chain, key, provider)?;

        Ok(PeerTls {
            own_id,
            server: Arc::new(server),
            admin_server: Arc::new(admin_server),
            client: Arc::new(client),
            not_after,
        })
    }

    /// Server side: requires a client certificate chaining to the cluster CA
    /// and naming exactly one node; ALPN "h2"; TLS 1.2 and 1.3.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// The remote admin port: requires a client certificate of the cluster
    /// CA naming one admin or one node ([`admin_caller_from_cert`]).
    pub fn admin_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.admin_server.clone())
    }

    /// Client side: presents our certificate and accepts the server only if it
    /// chains to the CA and carries exactly the SAN of the `ServerName` passed
    /// to `connect` (use [`PeerTls::server_name`]); ALPN "h2".
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }

    /// The name a connection to `peer_id` must be verified against: `node-<peer_id>`.
    pub fn server_name(peer_id: u64) -> ServerName<'static> {
        // "node-" plus decimal digits is always a valid DNS name, so the
        // fallback is unreachable; it exists only to avoid a panic path.
        ServerName::try_from(node_dns_name(peer_id))
            .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()))
    }

    /// Not-after time of our own certificate (for expiry warnings).
    pub fn own_cert_not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The node id this material was loaded for.
    pub fn own_id(&self) -> u64 {
        self.own_id
    }

    /// The rustls server configuration behind [`PeerTls::acceptor`], for
    /// transports that want the raw config.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The rustls client configuration behind [`PeerTls::connector`].
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

/// The client side of the remote admin port (`clusterctl --remote`): our
/// certificate (an admin's, or a node's for read-only calls) and the
/// cluster CA; the server must prove it is the node that was named.
pub fn admin_client_config(paths: &TlsPaths) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let roots = load_roots(&paths.ca)?;
    let chain = load_chain(&paths.cert, "certificate", "cert")?;
    let key = load_key(&paths.key)?;
    admin_caller_from_cert(&chain[0])?;
    node_client_config(paths, roots, chain, key, provider).map(Arc::new)
}

/// A client config that presents `chain` and accepts a server only if it
/// chains to the CA and names exactly the node dialled; ALPN "h2".
fn node_client_config(
    paths: &TlsPaths,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
) -> Result<ClientConfig, TlsError> {
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: paths.ca.clone(),
            reason: e.to_string(),
        })?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        // "dangerous" only because it is a custom verifier: it runs the
        // full WebPKI check first and then narrows it further.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeServerVerifier {
            inner: server_verifier,
        }))
        .with_client_auth_cert(chain, key)
        .map_err(config_err)?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(client)
}

/// Node id carried in a peer certificate (SAN DNS `node-<id>`); error if the
/// certificate names no node or several. Other SANs are ignored. This does not
/// verify the certificate: use it on certificates a verifier has accepted.
pub fn node_id_from_cert(der: &CertificateDer<'_>) -> Result<u64, TlsError> {
    let all = dns_names(der)?;
    let mut ids = Vec::new();
    for dns in &all {
        if let Some(id) = parse_node_dns_name(dns) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => Err(TlsError::NoNodeName {
            names: if all.is_empty() {
                "no DNS names".into()
            } else {
                all.join(", ")
            },
        }),
        many => Err(TlsError::SeveralNodeNames {
            names: many
                .iter()
                .map(|id| node_dns_name(*id))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// A certificate's serial number as lowercase hex without leading zeros or
/// colons: the spelling `tls.revoked_serials` uses.
pub fn cert_serial_hex(der: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCert(e.to_string()))?;
    Ok(normalize_serial(&cert.tbs_certificate.raw_serial_as_string()).unwrap_or_default())
}

/// Refuses a connection whose peer certificate is listed in `tls.revoked_serials`.
pub fn refuse_revoked(
    conn: &rustls::CommonState,
    revoked: &std::collections::BTreeSet<String>,
) -> Result<(), String> {
    if revoked.is_empty() {
        return Ok(());
    }
    let serial = peer_leaf(conn)
        .map(cert_serial_hex)
        .transpose()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    if revoked.contains(&serial) {
        return Err(format!(
            "its certificate (serial {serial}) is revoked by `tls.revoked_serials`"
        ));
    }
    Ok(())
}

/// The leaf certificate the other side of a TLS connection presented.
pub fn peer_leaf(conn: &rustls::CommonState) -> Option<&CertificateDer<'static>> {
    conn.peer_certificates().and_then(|c| c.first())
}

/// The node id of the peer of an accepted stream, from its verified certificate.
pub fn peer_node_id<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> Result<u64, TlsError> {
    let (_, conn) = stream.get_ref();
    let certs = conn
        .peer_certificates()
        .ok_or(TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    node_id_from_cert(leaf)
}

/// The node id of the server of a connected client stream, from its verified certificate.
pub fn server_node_id<IO>(stream: &tokio_rustls::client::TlsStream<IO>) -> Result<u64, TlsError> {
    let (_, conn) = stream.get_ref();
    let certs = conn
        .peer_certificates()
        .ok_or(TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    node_id_from_cert(leaf)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

fn read(path: &Path, what: &'static str, key: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn load_chain(
    path: &Path,
    what: &'static str,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what, key)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            key,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Empty {
            what,
            key,
            kind: "PEM certificate",
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    // Several CA certificates are accepted so a CA can be rotated by
    // distributing old+new in ca.crt before re-issuing node certificates.
    let certs = load_chain(path, "CA certificate", "ca")?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, "private key", "key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "private key",
            key: "key",
            kind: "PEM private key",
            path: path.to_path_buf(),
        },
        other => TlsError::BadPem {
            what: "private key",
            key: "key",
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

fn not_after_of(der: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let secs = cert.validity().not_after.timestamp();
    Ok(if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    })
}

/// Why a node certificate fails the checks a node applies to its own
/// certificate (and `certs init` to certificates it keeps).
#[derive(Debug)]
pub(crate) enum NodeCertProblem {
    NoIdentity(TlsError),
    WrongNode(u64),
    Rejected(rustls::Error),
}

impl fmt::Display for NodeCertProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeCertProblem::NoIdentity(e) => write!(f, "{e}"),
            NodeCertProblem::WrongNode(id) => write!(f, "it is for node {id}"),
            NodeCertProblem::Rejected(e) => f.write_str(&describe_rejection(e)),
        }
    }
}

/// Checks `chain` (leaf first) the way peers will: it names exactly node
/// `expected_id`, chains to `roots`, is within its validity period, and is
/// usable both as a server and as a client certificate.
pub(crate) fn check_node_cert(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    expected_id: u64,
) -> Result<(), NodeCertProblem> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(NodeCertProblem::NoIdentity(TlsError::NoPeerCertificate));
    };
    let id = node_id_from_cert(leaf).map_err(NodeCertProblem::NoIdentity)?;
    if id != expected_id {
        return Err(NodeCertProblem::WrongNode(id));
    }
    let provider = provider();
    let now = UnixTime::now();
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| NodeCertProblem::Rejected(rustls::Error::General(e.to_string())))?;
    server
        .verify_server_cert(
            leaf,
            intermediates,
            &PeerTls::server_name(expected_id),
            &[],
            now,
        )
        .map_err(NodeCertProblem::Rejected)?;
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
        .build()
        .map_err(|e| NodeCertProblem::Rejected(rustls::Error::General(e.to_string())))?;
    client
        .verify_client_cert(leaf, intermediates, now)
        .map_err(NodeCertProblem::Rejected)?;
    Ok(())
}

/// Turns the verifier's error into words an operator can act on.
fn describe_rejection(e: &rustls::Error) -> String {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "it was not issued by that CA".into(),
            // Every cluster CA has the same subject name, so a certificate from
            // another cluster finds a name-matching issuer and fails here.
            C::BadSignature => {
                "it was not issued by that CA (its signature does not verify against it)".into()
            }
            C::Expired => "it has expired".into(),
            C::ExpiredContext { not_after, .. } => format!("it expired on {}", ymd(not_after)),
            C::NotValidYet => "it is not valid yet (check the system clock)".into(),
            C::NotValidYetContext { not_before, .. } => {
                format!(
                    "it is not valid before {} (check the system clock)",
                    ymd(not_before)
                )
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "it lacks the serverAuth and clientAuth extended key usages peers require".into()
            }
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

fn ymd(t: &UnixTime) -> String {
    match i64::try_from(t.as_secs())
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
    {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        None => format!("{} (UNIX time)", t.as_secs()),
    }
}

fn identity_error(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// WebPKI server verification plus: the certificate must name exactly the
/// node that was dialled. WebPKI alone would accept a certificate that lists
/// several node names, which would let one key speak for several nodes.
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let id = node_id_from_cert(end_entity).map_err(identity_error)?;
        if server_name.to_str() != node_dns_name(id) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// WebPKI client verification plus an identity check: on the peer port the
/// certificate must name exactly one node, so that a connection that
/// completes the handshake always has a well-defined peer id; on the admin
/// port exactly one admin or node.
#[derive(Debug)]
struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    identity: fn(&CertificateDer<'_>) -> Result<(), TlsError>,
}

impl ClientCertVerifier for IdentityClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        (self.identity)(end_entity).map_err(identity_error)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS material and revocation list in force, swapped as a whole on
/// SIGHUP: new connections use the new material, live ones keep theirs.
#[derive(Clone)]
pub struct LiveTls {
    current: Arc<std::sync::RwLock<(PeerTls, Arc<std::collections::BTreeSet<String>>)>>,
    /// Bumped by every [`LiveTls::replace`], so live connections notice a
    /// new revocation list with one atomic load per read or write.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl LiveTls {
    pub fn new(tls: PeerTls, revoked: std::collections::BTreeSet<String>) -> LiveTls {
        LiveTls {
            current: Arc::new(std::sync::RwLock::new((tls, Arc::new(revoked)))),
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The material in force now.
    pub fn get(&self) -> (PeerTls, Arc<std::collections::BTreeSet<String>>) {
        // A poisoned lock still holds a complete, valid pair: writers swap whole values.
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        (guard.0.clone(), guard.1.clone())
    }

    pub fn replace(&self, tls: PeerTls, revoked: std::collections::BTreeSet<String>) {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = (tls, Arc::new(revoked));
        drop(guard);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A TLS stream that fails (and so closes its connection) as soon as its
/// peer's certificate appears in a reloaded `tls.revoked_serials`: a SIGHUP
/// revocation cuts live connections, not only new ones.
pub struct RevocableStream<S> {
    inner: S,
    live: LiveTls,
    /// The peer certificate's serial (normalized hex).
    serial: String,
    /// What it is called in the log line.
    who: String,
    seen: u64,
    revoked: bool,
}

impl<S> RevocableStream<S> {
    /// `serial` is the peer certificate's; the list in force at `live` was
    /// already checked when the connection was admitted.
    pub fn new(inner: S, live: LiveTls, serial: String, who: String) -> Self {
        let seen = live.generation();
        RevocableStream {
            inner,
            live,
            serial,
            who,
            seen,
            revoked: false,
        }
    }

    fn check(&mut self) -> std::io::Result<()> {
        if !self.revoked {
            let now = self.live.generation();
            if now == self.seen {
                return Ok(());
            }
            self.seen = now;
            if !self.live.get().1.contains(&self.serial) {
                return Ok(());
            }
            self.revoked = true;
            tracing::warn!(
                serial = %self.serial,
                "closed the live connection of {}: its certificate (serial {}) is now revoked by `tls.revoked_serials`",
                self.who,
                self.serial
            );
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("the certificate of {} was revoked", self.who),
        ))
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for RevocableStream<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.check()?;
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for RevocableStream<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.check()?;
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.check()?;
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::names::valid_admin_name;
    use crate::net::certs::{init_certs, node_cert_path, node_key_path};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn paths(dir: &Path, ca_dir: &Path, id: u64) -> TlsPaths {
        TlsPaths {
            ca: ca_dir.join("ca.crt"),
            cert: node_cert_path(dir, id),
            key: node_key_path(dir, id),
        }
    }

    fn load(dir: &Path, id: u64) -> PeerTls {
        PeerTls::load(&paths(dir, dir, id), id).unwrap()
    }

    /// Runs accept and connect concurrently; returns the server's view
    /// (peer id) and whether the client side completed.
    async fn handshake(
        server: &PeerTls,
        connector: tokio_rustls::TlsConnector,
        dial: u64,
    ) -> (Result<u64, String>, Result<(), String>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = server.acceptor();
        let srv = async move {
            let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
            let id = peer_node_id(&s).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ping");
            s.write_all(b"pong").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        };
        let cli = async move {
            let mut c = connector
                .connect(PeerTls::server_name(dial), b)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(server_node_id(&c).map_err(|e| e.to_string())?, dial);
            c.write_all(b"ping").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"pong");
            Ok::<_, String>(())
        };
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(srv, cli) })
            .await
            .expect("handshake hung")
    }

    #[test]
    fn node_id_from_issued_cert() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[42], 825).unwrap();
        let pem = fs::read(node_cert_path(dir.path(), 42)).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(node_id_from_cert(&der).unwrap(), 42);
        let ca =
            CertificateDer::from_pem_slice(&fs::read(dir.path().join("ca.crt")).unwrap()).unwrap();
        assert!(matches!(
            node_id_from_cert(&ca),
            Err(TlsError::NoNodeName { .. })
        ));
    }

    #[test]
    fn admin_callers_are_one_admin_or_one_node() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[3], 825).unwrap();
        crate::net::certs::issue_admin(dir.path(), "alice", 30).unwrap();
        let load = |name: &str| {
            CertificateDer::from_pem_slice(&fs::read(dir.path().join(name)).unwrap()).unwrap()
        };
        assert_eq!(
            admin_caller_from_cert(&load("admin-alice.crt")).unwrap(),
            AdminCaller::Admin("alice".into())
        );
        assert_eq!(
            admin_caller_from_cert(&load("node-3.crt")).unwrap(),
            AdminCaller::Node(3)
        );
        // An admin certificate is no node certificate: the peer port refuses it.
        assert!(node_id_from_cert(&load("admin-alice.crt")).is_err());
        let key = rcgen::KeyPair::generate().unwrap();
        for names in [
            vec!["admin-a", "admin-b"],
            vec!["admin-a", "node-1"],
            vec!["admin-", "other"],
        ] {
            let params = rcgen::CertificateParams::new(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            let err = admin_caller_from_cert(params.self_signed(&key).unwrap().der()).unwrap_err();
            assert!(
                matches!(err, TlsError::NoAdminIdentity { .. }),
                "{names:?}: {err}"
            );
        }
        for bad in ["", "-x", "Alice", "a b", "a/b", &"x".repeat(33)] {
            assert!(!valid_admin_name(bad), "{bad:?}");
            assert!(matches!(
                crate::net::certs::issue_admin(dir.path(), bad, 30),
                Err(crate::net::certs::CertError::BadAdminName(_))
            ));
        }
        assert!(matches!(
            crate::net::certs::issue_admin(dir.path(), "alice", 30),
            Err(crate::net::certs::CertError::AdminExists { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            crate::net::certs::issue_admin(empty.path(), "bob", 30),
            Err(crate::net::certs::CertError::NoCa { .. })
        ));
    }

    #[test]
    fn node_name_parsing_is_canonical() {
        assert_eq!(parse_node_dns_name("node-1"), Some(1));
        assert_eq!(
            parse_node_dns_name("node-18446744073709551615"),
            Some(u64::MAX)
        );
        for bad in [
            "node-0", "node-01", "node-+1", "node-", "node-1a", "Node-1", "xnode-1", "node--1",
        ] {
            assert_eq!(parse_node_dns_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn several_node_names_are_rejected() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["node-1".into(), "node-2".into(), "other".into()])
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let err = node_id_from_cert(cert.der()).unwrap_err();
        assert!(matches!(err, TlsError::SeveralNodeNames { .. }), "{err}");
        let params = rcgen::CertificateParams::new(vec!["node-7".into(), "other".into()]).unwrap();
        assert_eq!(
            node_id_from_cert(params.self_signed(&key).unwrap().der()).unwrap(),
            7
        );
    }

    #[test]
    fn load_accepts_own_cert_and_reports_expiry() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[1], 30).unwrap();
        let tls = load(dir.path(), 1);
        assert_eq!(tls.own_id(), 1);
        let left = tls
            .own_cert_not_after()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            left > Duration::from_secs(29 * 86400) && left <= Duration::from_secs(30 * 86400),
            "{left:?}"
        );
    }

    #[test]
    fn load_rejects_cert_for_another_node() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[1, 2], 825).unwrap();
        let err = PeerTls::load(&paths(dir.path(), dir.path(), 2), 1).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                TlsError::WrongNode {
                    cert_id: 2,
                    own_id: 1,
                    ..
                }
            ),
            "{msg}"
        );
        let want = format!(
            "certificate {} is for node 2, not for this node (id 1)",
            node_cert_path(dir.path(), 2).display()
        );
        assert!(msg.starts_with(&want), "{msg}");
    }

    #[test]
    fn load_rejects_cert_from_another_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_certs(a.path(), &[1], 825).unwrap();
        init_certs(b.path(), &[1], 825).unwrap();
        let err = PeerTls::load(&paths(b.path(), a.path(), 1), 1).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TlsError::NotFromCa { .. }), "{msg}");
        assert!(
            msg.contains(&node_cert_path(b.path(), 1).display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&a.path().join("ca.crt").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("not issued by that CA"), "{msg}");
    }

    #[test]
    fn load_rejects_mismatched_key_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[1, 2], 825).unwrap();
        let mut p = paths(dir.path(), dir.path(), 1);
        p.key = node_key_path(dir.path(), 2);
        let err = PeerTls::load(&p, 1).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");

        let mut p = paths(dir.path(), dir.path(), 1);
        p.cert = dir.path().join("missing.crt");
        let msg = PeerTls::load(&p, 1).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("cannot read certificate {}", p.cert.display())),
            "{msg}"
        );
        assert!(
            msg.ends_with("run `clusterctl certs init` or fix [tls] cert"),
            "{msg}"
        );

        let mut p = paths(dir.path(), dir.path(), 1);
        p.key = node_cert_path(dir.path(), 1);
        let err = PeerTls::load(&p, 1).unwrap_err();
        assert!(matches!(err, TlsError::Empty { key: "key", .. }), "{err}");
    }

    #[tokio::test]
    async fn handshake_same_ca_identifies_peer() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[1, 2], 825).unwrap();
        let (n1, n2) = (load(dir.path(), 1), load(dir.path(), 2));
        let (srv, cli) = handshake(&n2, n1.connector(), 2).await;
        assert_eq!(srv, Ok(1));
        assert_eq!(cli, Ok(()));
        // and the other direction
        let (srv, cli) = handshake(&n1, n2.connector(), 1).await;
        assert_eq!(srv, Ok(2));
        assert_eq!(cli, Ok(()));
    }

    #[tokio::test]
    async fn handshake_over_tls12_works_too() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[1, 2], 825).unwrap();
        let n2 = load(dir.path(), 2);
        // Same verifier and client certificate as PeerTls uses, but a client
        // that offers only TLS 1.2.
        let p = paths(dir.path(), dir.path(), 1);
        let chain = load_chain(&p.cert, "certificate", "cert").unwrap();
        let key = load_key(&p.key).unwrap();
        let roots = load_roots(&p.ca).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeServerVerifier { inner: verifier }))
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (srv, cli) = handshake(&n2, tokio_rustls::TlsConnector::from(Arc::new(cfg)), 2).await;
        assert_eq!(srv, Ok(1));
        assert_eq!(cli, Ok(()));
    }

    #[tokio::test]
    async fn handshake_rejects_client_from_other_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_certs(a.path(), &[1, 2], 825).unwrap();
        init_certs(b.path(), &[1], 825).unwrap();
        let server = load(a.path(), 2);
        // The intruder trusts the cluster CA (it can verify the server) but
        // its own certificate comes from another CA.
        let intruder = PeerTls::load(&paths(b.path(), b.path(), 1), 1).unwrap();
        let (srv, _cli) = handshake(&server, intruder.connector(), 2).await;
        assert!(srv.is_err(), "server accepted a client from another CA");
        // Even a client that trusts the server's CA but presents a foreign cert.
        let client = client_config_with(&a.path().join("ca.crt"), Some((b.path(), 1)));
        let (srv, _cli) = handshake(&server, client, 2).await;
        let err = srv.unwrap_err();
        assert!(
            err.contains("BadSignature") || err.contains("UnknownIssuer"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn handshake_rejects_server_with_wrong_node_name() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[1, 2, 3], 825).unwrap();
        let (n1, n2) = (load(dir.path(), 1), load(dir.path(), 2));
        // Client dials node-3 but node-2 answers (e.g. a stale NAT mapping).
        let (srv, cli) = handshake(&n2, n1.connector(), 3).await;
        let err = cli.unwrap_err();
        assert!(
            err.contains("node-3") || err.contains("NotValidForName"),
            "{err}"
        );
        assert!(srv.is_err());
    }

    #[tokio::test]
    async fn handshake_rejects_client_without_certificate() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[1, 2], 825).unwrap();
        let server = load(dir.path(), 2);
        let client = client_config_with(&dir.path().join("ca.crt"), None);
        let (srv, _cli) = handshake(&server, client, 2).await;
        let err = srv.unwrap_err();
        assert!(err.to_lowercase().contains("certificate"), "{err}");
    }

    /// A client that trusts `ca` and presents the given node's certificate (or none).
    fn client_config_with(ca: &Path, cert: Option<(&Path, u64)>) -> tokio_rustls::TlsConnector {
        let roots = load_roots(ca).unwrap();
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut cfg = match cert {
            Some((dir, id)) => {
                let chain = load_chain(&node_cert_path(dir, id), "certificate", "cert").unwrap();
                let key = load_key(&node_key_path(dir, id)).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}
