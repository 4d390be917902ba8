//! How Cohort processes reach each other over gRPC, and show who they are.
//!
//! - **Who**: a bearer token in the `authorization` metadata of every request ([`Credentials`],
//!   an interceptor the clients wrap their channel in), read back by servers with
//!   [`bearer_token`].
//! - **Where, privately**: [`endpoint`] turns an address into a channel endpoint, with TLS
//!   when the cluster has a CA ([`CaCertificate`], verifying the server's certificate against
//!   it) or the address says `https://` (verified against the Mozilla roots); servers serve
//!   TLS with a [`ServerTls`] identity. One function for every client (CLI, worker, rank,
//!   parameter-server client), so none can forget to verify.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

use crate::secret::Secret;

/// The metadata key a token travels in.
pub const AUTHORIZATION: &str = "authorization";

/// What precedes the token in [`AUTHORIZATION`].
const BEARER: &str = "Bearer ";

/// A channel whose every request carries the caller's token.
pub type Connection = InterceptedService<Channel, Credentials>;

/// The bearer token of `metadata`, if it has a well-formed one.
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix(BEARER)
        .filter(|token| !token.is_empty())
}

/// Adds the caller's token to every request (none: calls go out without one, and a Cohort
/// server refuses them as unauthenticated).
#[derive(Clone, Default)]
pub struct Credentials {
    header: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.header.is_some() {
            "Credentials(token)"
        } else {
            "Credentials(none)"
        };
        formatter.write_str(shown)
    }
}

/// A token that cannot travel in a header (not visible ASCII).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token is not a Cohort token: expected visible ASCII characters only")]
pub struct MalformedToken;

impl Credentials {
    /// Credentials showing `token`, if any.
    pub fn new(token: Option<&Secret>) -> Result<Self, MalformedToken> {
        let header = match token {
            None => None,
            Some(token) => {
                let text = token.expose();
                if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_graphic()) {
                    return Err(MalformedToken);
                }
                let mut value: AsciiMetadataValue = format!("{BEARER}{text}")
                    .parse()
                    .map_err(|_| MalformedToken)?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Self { header })
    }

    /// Wraps `channel` so that every request shows these credentials.
    pub fn wrap<S>(self, channel: S) -> InterceptedService<S, Credentials> {
        InterceptedService::new(channel, self)
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, header.clone());
        }
        Ok(request)
    }
}

/// Largest certificate or key file read, in bytes: a chain of a few certificates is a few KiB.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why a TLS setting or an address cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The address is not `host:port` or `https://host:port`.
    #[error("address {address:?}: {reason}")]
    Address {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate or key file that cannot be read or is not PEM.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Reads a PEM file of at most [`MAX_PEM_BYTES`] holding a block labelled `label`.
fn read_pem(path: &Path, label: &str) -> Result<Vec<u8>, TransportError> {
    let failure = |reason: String| TransportError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let size = std::fs::metadata(path)
        .map_err(|error| failure(format!("cannot read it: {error}")))?
        .len();
    if size > MAX_PEM_BYTES {
        return Err(failure(format!(
            "{size} bytes, expected a PEM file of at most {MAX_PEM_BYTES}"
        )));
    }
    let bytes = std::fs::read(path).map_err(|error| failure(format!("cannot read it: {error}")))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(label) {
        return Err(failure(format!("expected PEM holding a {label}")));
    }
    Ok(bytes)
}

/// The certificate of the authority that signs a cluster's certificates (PEM): clients trust a
/// server only if its certificate chains to it.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificate {
    pem: Arc<[u8]>,
}

impl std::fmt::Debug for CaCertificate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "CaCertificate({} bytes)", self.pem.len())
    }
}

impl CaCertificate {
    /// Reads a CA certificate file (`cohort certs create` writes `ca.pem`).
    pub fn read(path: &Path) -> Result<Self, TransportError> {
        Ok(Self {
            pem: read_pem(path, "CERTIFICATE")?.into(),
        })
    }
}

/// A server's certificate and private key (PEM files): what it shows its TLS clients.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerTls {
    certificate: Arc<[u8]>,
    key: Arc<[u8]>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ServerTls(..)")
    }
}

impl ServerTls {
    /// Reads a certificate (chain) and its private key. Whether they belong together is
    /// checked when a server starts with them.
    pub fn read(certificate: &Path, key: &Path) -> Result<Self, TransportError> {
        Ok(Self {
            certificate: read_pem(certificate, "CERTIFICATE")?.into(),
            key: read_pem(key, "PRIVATE KEY")?.into(),
        })
    }

    /// The server configuration tonic takes.
    pub fn config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&*self.certificate, &*self.key))
    }
}

/// The prefix of an address that asks for TLS even without a cluster CA.
const HTTPS: &str = "https://";

/// Whether a client of `address` speaks TLS: with a CA, or when the address says `https://`.
pub fn uses_tls(address: &str, ca: Option<&CaCertificate>) -> bool {
    ca.is_some() || address.starts_with(HTTPS)
}

/// The endpoint of a server at `address` (`host:port`, or `https://host:port`): plaintext
/// HTTP/2 unless [`uses_tls`], then TLS that verifies the server's certificate for `host`
/// against `ca`, or against the Mozilla roots when there is none.
pub fn endpoint(address: &str, ca: Option<&CaCertificate>) -> Result<Endpoint, TransportError> {
    let failure = |reason: &str| TransportError::Address {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    let host_port = address.strip_prefix(HTTPS).unwrap_or(address);
    if host_port.contains('/') {
        return Err(failure("expected host:port or https://host:port"));
    }
    let (host, port) = host_port
        .rsplit_once(':')
        .ok_or_else(|| failure("expected host:port, no port given"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(failure("expected host:port with a port of 1 to 65535"));
    }
    if !uses_tls(address, ca) {
        return Endpoint::from_shared(format!("http://{host_port}"))
            .map_err(|error| failure(&error.to_string()));
    }
    let tls = ClientTlsConfig::new().domain_name(host);
    let tls = match ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(&*ca.pem)),
        None => tls.with_webpki_roots(),
    };
    Endpoint::from_shared(format!("https://{host_port}"))
        .and_then(|endpoint| endpoint.tls_config(tls))
        .map_err(|error| failure(&error.to_string()))
}

/// How often a coordinator client pings a connection that has calls open, and how long it
/// waits for the answer before it takes the coordinator for gone (a paused or partitioned
/// leader holds connections open without answering).
pub const COORDINATOR_KEEP_ALIVE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3));

/// The endpoint of the coordinator at `address` ([`endpoint`]), with what every coordinator
/// client uses: no Nagle delay, and keep-alive pings ([`COORDINATOR_KEEP_ALIVE`]).
pub fn coordinator_endpoint(
    address: &str,
    ca: Option<&CaCertificate>,
) -> Result<Endpoint, TransportError> {
    let (interval, timeout) = COORDINATOR_KEEP_ALIVE;
    Ok(endpoint(address, ca)?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(interval)
        .keep_alive_timeout(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_travels_as_a_sensitive_bearer_header_and_reads_back() {
        let secret = Secret::new("cohort-user-0123abcd");
        let mut credentials = Credentials::new(Some(&secret)).unwrap();
        let request = credentials.call(Request::new(())).unwrap();
        let header = request.metadata().get(AUTHORIZATION).unwrap();
        assert!(header.is_sensitive());
        assert_eq!(
            bearer_token(request.metadata()),
            Some("cohort-user-0123abcd")
        );
        assert_eq!(format!("{credentials:?}"), "Credentials(token)");
    }

    #[test]
    fn no_token_sends_nothing_and_bad_headers_read_as_none() {
        let mut none = Credentials::new(None).unwrap();
        let request = none.call(Request::new(())).unwrap();
        assert_eq!(bearer_token(request.metadata()), None);
        for header in ["Basic abc", "Bearer ", "bearer abc"] {
            let mut request = Request::new(());
            request
                .metadata_mut()
                .insert(AUTHORIZATION, header.parse().unwrap());
            assert_eq!(bearer_token(request.metadata()), None, "{header}");
        }
        for bad in ["", "with space", "tab\t", "ü"] {
            assert_eq!(
                Credentials::new(Some(&Secret::new(bad))).unwrap_err(),
                MalformedToken,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_address_with_a_ca_or_https_asks_for_tls_and_a_bad_one_names_the_problem() {
        let temporary = tempfile::tempdir().unwrap();
        let directory = temporary.path();
        let ca_path = directory.join("ca.pem");
        std::fs::write(
            &ca_path,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let ca = CaCertificate::read(&ca_path).unwrap();
        assert!(!uses_tls("10.0.0.1:7077", None));
        assert!(uses_tls("10.0.0.1:7077", Some(&ca)));
        assert!(uses_tls("https://head.example:7077", None));
        assert_eq!(
            endpoint("10.0.0.1:7077", None).unwrap().uri().scheme_str(),
            Some("http")
        );
        assert_eq!(
            endpoint("[::1]:7077", Some(&ca))
                .unwrap()
                .uri()
                .scheme_str(),
            Some("https")
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1:http",
            ":7077",
            "https://h:1/path",
            "h:70000",
        ] {
            let error = endpoint(bad, None).unwrap_err().to_string();
            assert!(error.contains(bad), "{error}");
        }
        let not_pem = directory.join("key.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let error = CaCertificate::read(&not_pem).unwrap_err().to_string();
        assert!(
            error.contains("expected PEM holding a CERTIFICATE"),
            "{error}"
        );
        let error = ServerTls::read(&ca_path, &ca_path).unwrap_err().to_string();
        assert!(error.contains("PRIVATE KEY"), "{error}");
        let error = CaCertificate::read(&directory.join("absent.pem"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot read it"), "{error}");
    }
}
