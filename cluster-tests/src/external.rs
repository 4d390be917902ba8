//! What the harnesses of real external components ([`crate::etcd`], [`crate::prometheus`])
//! share: finding the binary (or skipping, or failing under `CI=true`), free loopback ports,
//! plain HTTP/1.1 requests, and log tails for startup failures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The binary `$env_var` names, else `standard`, else `name` on `PATH`; `None`, after saying
/// why on stderr, when there is none and the test may skip; a panic under `CI=true` (CI must
/// run every test), naming `package`.
pub fn binary_or_skip(
    test_name: &str,
    env_var: &str,
    standard: &str,
    name: &str,
    package: &str,
) -> Option<PathBuf> {
    if let Some(binary) = find_binary(env_var, standard, name) {
        return Some(binary);
    }
    let message = format!(
        "{test_name}: the {name} binary was not found (${env_var}, {standard}, PATH); run \
         scripts/setup.sh to install {package}"
    );
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{message}");
    }
    eprintln!("skipping {message}");
    None
}

/// The binary `$env_var` names, else `standard`, else `name` on `PATH`, if one exists.
pub fn find_binary(env_var: &str, standard: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path)).filter(|path| path.is_file());
    }
    let standard = PathBuf::from(standard);
    if standard.is_file() {
        return Some(standard);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|directory| directory.join(name))
        .find(|path| path.is_file())
}

/// Returns a loopback address whose port the OS just reported free.
pub fn free_loopback_address() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|error| format!("finding a free loopback port: {error}"))
}

/// `GET path` from the HTTP/1.1 server at `address` (with `token` as a bearer token): the
/// status code and the body. Bounded by a 2-second connect and a 10-second read timeout.
pub fn http_get(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut payload = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        payload.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    payload
}

/// Returns the last lines of a log file, for startup failure messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
