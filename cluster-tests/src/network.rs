//! Separate network hosts for one test: a Linux network namespace per host, each with its own
//! address on a test subnet, joined by veth pairs to a bridge that lives in a namespace of its
//! own.
//!
//! ```text
//!   host 0 (netns)        host 1 (netns)        ...
//!   eth0 10.77.0.1/24     eth0 10.77.0.2/24
//!     │ veth                │ veth
//!   ──┴── br0 (bridge netns) ──┴─────────────────
//! ```
//!
//! The subnet exists only inside namespaces the test made: the machine's own namespace has no
//! interface on it and no route to it, so a test that only addresses hosts of its network
//! cannot reach anything else (and two tests may use the same subnet: each has its own
//! bridge). A process joins a host with [`TestNetwork::enter`], which moves the child into the
//! host's namespace before it runs (`setns`), keeping its pid. Everything is removed on drop,
//! including after a panic. Creating namespaces needs root (`CAP_SYS_ADMIN`) and `ip` from
//! iproute2; [`TestNetwork::create_or_skip`] explains and skips where they are missing, except
//! under `CI=true`, where it fails.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// The test subnet's first three octets; host `i` is `.{i + 1}`.
const SUBNET: [u8; 3] = [10, 77, 0];

/// Most hosts one network holds.
pub const MAX_HOSTS: usize = 200;

/// Networks made by this process, for unique namespace names.
static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// Separate network hosts for one test; removed on drop.
#[derive(Debug)]
pub struct TestNetwork {
    /// Namespace names of the hosts, by index.
    hosts: Vec<String>,
    /// Namespace of the bridge.
    bridge: String,
}

impl TestNetwork {
    /// Creates `hosts` hosts, or returns `None` after explaining on stderr why the test is
    /// skipped (not root, or no `ip`/namespaces).
    ///
    /// # Panics
    ///
    /// When the network cannot be made and `CI=true`.
    pub fn create_or_skip(test_name: &str, hosts: usize) -> Option<Self> {
        match Self::create(hosts) {
            Ok(network) => Some(network),
            Err(error) => {
                let message = format!(
                    "{test_name}: separate network hosts are unavailable: {error:#} (they need \
                     root and iproute2's `ip`)"
                );
                if std::env::var("CI").is_ok_and(|value| value == "true") {
                    panic!("{message}");
                }
                eprintln!("skipping {message}");
                None
            }
        }
    }

    /// Creates `hosts` hosts joined by a bridge.
    pub fn create(hosts: usize) -> Result<Self> {
        if hosts == 0 || hosts > MAX_HOSTS {
            bail!("{hosts} hosts, expected 1 to {MAX_HOSTS}");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("not running as root");
        }
        let prefix = format!(
            "cohort-{}-{}",
            std::process::id(),
            NETWORKS.fetch_add(1, Ordering::Relaxed)
        );
        // Names first, so that drop removes whatever part was made.
        let mut network = Self {
            hosts: Vec::with_capacity(hosts),
            bridge: format!("{prefix}-br"),
        };
        ip(&["netns", "add", &network.bridge])?;
        ip(&[
            "-n",
            &network.bridge,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
        ])?;
        ip(&["-n", &network.bridge, "link", "set", "br0", "up"])?;
        for index in 0..hosts {
            let host = format!("{prefix}-h{index}");
            ip(&["netns", "add", &host])?;
            network.hosts.push(host.clone());
            let port = format!("v{index}");
            ip(&[
                "-n",
                &network.bridge,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host,
            ])?;
            ip(&["-n", &network.bridge, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &network.bridge, "link", "set", &port, "up"])?;
            let address = format!("{}/24", network.address(index));
            ip(&["-n", &host, "addr", "add", &address, "dev", "eth0"])?;
            ip(&["-n", &host, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
        }
        Ok(network)
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Host `index`'s address on the test subnet.
    ///
    /// # Panics
    ///
    /// When `index` is not a host of this network.
    pub fn address(&self, index: usize) -> Ipv4Addr {
        assert!(index < MAX_HOSTS, "host {index} of at most {MAX_HOSTS}");
        let last = u8::try_from(index + 1).expect("MAX_HOSTS fits an octet");
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], last)
    }

    /// Makes `command` run on host `index`: the child joins the host's network namespace
    /// before it executes, so it sees only that host's interfaces.
    pub fn enter(&self, command: &mut Command, index: usize) -> Result<()> {
        let host = self
            .hosts
            .get(index)
            .with_context(|| format!("no host {index}: the network has {}", self.hosts.len()))?;
        let path = CString::new(format!("/run/netns/{host}"))?;
        // SAFETY: between fork and exec the closure only makes system calls (open, setns,
        // close), which are async-signal-safe, on a path allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let joined = libc::setns(fd, libc::CLONE_NEWNET);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if joined != 0 {
                    return Err(error);
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Cuts host `index` off the network (its link to the bridge goes down).
    pub fn cut(&self, index: usize) -> Result<()> {
        self.set_link(index, "down")
    }

    /// Connects host `index` again after [`Self::cut`].
    pub fn heal(&self, index: usize) -> Result<()> {
        self.set_link(index, "up")
    }

    /// Limits what host `index` sends to `rate` (tc's units, e.g. `1gbit`, `100mbit`) with a
    /// token bucket filter.
    pub fn rate_limit(&self, index: usize, rate: &str) -> Result<()> {
        let host = self.host(index)?;
        ip_tool(
            "tc",
            &[
                "-n", host, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                "burst", "256kb", "latency", "50ms",
            ],
        )
    }

    /// Sets host `index`'s bridge port up or down.
    fn set_link(&self, index: usize, state: &str) -> Result<()> {
        self.host(index)?;
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &format!("v{index}"),
            state,
        ])
    }

    /// Host `index`'s namespace name.
    fn host(&self, index: usize) -> Result<&str> {
        self.hosts
            .get(index)
            .map(String::as_str)
            .with_context(|| format!("no host {index}: the network has {}", self.hosts.len()))
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        // Removing a host's namespace removes its end of the veth pair and so the other end.
        for namespace in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            if let Err(error) = ip(&["netns", "delete", namespace]) {
                eprintln!("removing network namespace {namespace}: {error:#}");
            }
        }
    }
}

/// Runs `ip args...`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    ip_tool("ip", args)
}

/// Runs an iproute2 tool, failing with its stderr.
fn ip_tool(tool: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{tool}`"))?;
    if !output.status.success() {
        bail!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Runs a shell `script` on host `index` and returns its stdout.
    fn run_on(network: &TestNetwork, index: usize, script: &str) -> String {
        let mut command = Command::new("sh");
        command.args(["-c", script]).stdin(Stdio::null());
        network.enter(&mut command, index).unwrap();
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "`{script}` on host {index}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn hosts_reach_each_other_and_only_through_the_bridge() {
        let Some(network) = TestNetwork::create_or_skip("network tests", 2) else {
            return;
        };
        // Host 1 listens on its address; host 0 connects and the bytes arrive.
        let listener_script = format!(
            "exec {} -c 'import socket; s = socket.socket(); s.bind((\"{}\", 0)); \
             s.listen(1); print(s.getsockname()[1], flush=True); c, _ = s.accept(); \
             print(c.recv(16).decode(), flush=True)'",
            "python3",
            network.address(1)
        );
        let mut listener = Command::new("sh");
        listener
            .args(["-c", &listener_script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        network.enter(&mut listener, 1).unwrap();
        let mut listener = listener.spawn().unwrap();
        let mut stdout = listener.stdout.take().unwrap();
        let mut port = String::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            port.push(char::from(byte[0]));
        }
        let target = format!("{}:{}", network.address(1), port.trim());
        run_on(
            &network,
            0,
            &format!(
                "exec python3 -c 'import socket; s = socket.create_connection((\"{}\", {}), \
                 timeout=5); s.sendall(b\"across\")'",
                network.address(1),
                port.trim()
            ),
        );
        let mut received = String::new();
        stdout.read_to_string(&mut received).unwrap();
        assert_eq!(received.trim(), "across", "sent to {target}");
        assert!(listener.wait().unwrap().success());

        // The machine's own namespace has no interface on the subnet (nothing is sent to it:
        // from there, the address would leave through the default route).
        let own = Command::new("ip")
            .args(["-o", "-4", "addr"])
            .output()
            .unwrap();
        let subnet = format!("{}.{}.{}.", SUBNET[0], SUBNET[1], SUBNET[2]);
        assert!(!String::from_utf8_lossy(&own.stdout).contains(&subnet));

        // A cut host is unreachable, and reachable again once healed (a closed port answers
        // "refused" from a reachable host and nothing from a cut one).
        let probe = format!(
            "exec python3 -c 'import socket\ntry:\n socket.create_connection((\"{}\", 9), \
             timeout=1)\nexcept ConnectionRefusedError:\n print(\"up\")\nexcept OSError:\n \
             print(\"down\")'",
            network.address(1)
        );
        network.cut(1).unwrap();
        assert_eq!(run_on(&network, 0, &probe).trim(), "down");
        network.heal(1).unwrap();
        assert_eq!(run_on(&network, 0, &probe).trim(), "up");
    }
}
