//! How a Cohort process shows who it is on a gRPC call: a bearer token in the `authorization`
//! metadata of every request ([`Credentials`], an interceptor the clients wrap their channel
//! in), and how a server reads it back ([`bearer_token`]).

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
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
    pub fn wrap(self, channel: Channel) -> Connection {
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
}
