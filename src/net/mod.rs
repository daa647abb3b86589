//! Peer links: the wire types and their conversions, outgoing channels, the
//! authenticated accept loop and the peer gRPC service, TLS material and
//! certificates.
//!
//! Invariant 5 is owned here: every peer connection is mutual TLS against the
//! cluster CA, a peer's node id comes from its certificate and never from its
//! address, and protobuf types never pass this layer's edges.

#[cfg(feature = "node")]
pub mod accept;
pub mod certs;
#[cfg(feature = "node")]
pub mod peer;
pub mod proto;
pub mod tls;
#[cfg(feature = "node")]
pub mod transport;
