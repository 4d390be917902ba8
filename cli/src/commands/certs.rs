//! `cohort certs create`: a cluster's certificate authority and the certificates it signs, so
//! that a cluster serves TLS without an external PKI.
//!
//! The directory holds `ca.pem` (give it to every client: `--ca`, `COHORT_CA`, or the
//! credentials file), `ca-key.pem` (keep it offline once the certificates are made), and one
//! `NAME.pem` / `NAME-key.pem` pair per certificate. Keys are ECDSA P-256, written readable by
//! their owner alone; an existing file is never overwritten.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::args::{CertsArgs, CertsCommand, CertsCreateArgs};

/// Days the CA is valid.
const CA_DAYS: i64 = 3650;
/// Most days a certificate may be valid (what browsers accepted until 2020, 825 days, is far
/// shorter; a cluster rotates its own).
const MAX_DAYS: u32 = 3650;
/// The CA's file names.
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";

/// `cohort certs`.
pub fn certs(args: CertsArgs) -> Result<ExitCode> {
    match args.command {
        CertsCommand::Create(args) => create(&args),
    }
}

fn create(args: &CertsCreateArgs) -> Result<ExitCode> {
    cohort_proto::NodeId::new(args.name.as_str()).with_context(|| {
        format!(
            "--name {:?}: expected a name like coordinator or node-2 (it names files)",
            args.name
        )
    })?;
    if args.days == 0 || args.days > MAX_DAYS {
        bail!("--days {}, expected 1 to {MAX_DAYS}", args.days);
    }
    let out = &args.out;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("creating {}", out.display()))?;
    let certificate_path = out.join(format!("{}.pem", args.name));
    let key_path = out.join(format!("{}-key.pem", args.name));
    for path in [&certificate_path, &key_path] {
        if path.exists() {
            bail!(
                "{} exists: remove it, or choose another --name",
                path.display()
            );
        }
    }
    let now = OffsetDateTime::now_utc();
    let (issuer, made_ca) = load_or_make_ca(out, now)?;

    let mut params = CertificateParams::new(args.hosts.clone()).with_context(|| {
        format!(
            "--host {}: not a host name or IP address",
            args.hosts.join(" ")
        )
    })?;
    params.distinguished_name = distinguished_name(&args.name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(args.days));
    let key = KeyPair::generate().context("generating a key")?;
    let certificate = params
        .signed_by(&key, &issuer)
        .context("signing the certificate")?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&certificate_path, &certificate.pem(), 0o644)?;

    if made_ca {
        println!(
            "made a CA: {} (give it to every client and worker) and {} (keep it private; \
             offline once your certificates are made)",
            out.join(CA_CERT).display(),
            out.join(CA_KEY).display()
        );
    }
    println!(
        "made {} and {} for {}, valid {} days",
        certificate_path.display(),
        key_path.display(),
        args.hosts.join(", "),
        args.days
    );
    Ok(ExitCode::SUCCESS)
}

/// The CA in `out`, made there if there is none (then `true`).
fn load_or_make_ca(out: &Path, now: OffsetDateTime) -> Result<(Issuer<'static, KeyPair>, bool)> {
    let certificate_path = out.join(CA_CERT);
    let key_path = out.join(CA_KEY);
    match (certificate_path.exists(), key_path.exists()) {
        (true, true) => {
            let key_pem = crate::credentials::read_private(&key_path)?
                .with_context(|| format!("{} vanished", key_path.display()))?;
            let key = KeyPair::from_pem(&key_pem)
                .with_context(|| format!("{}: not a private key", key_path.display()))?;
            let certificate_pem = std::fs::read_to_string(&certificate_path)
                .with_context(|| format!("reading {}", certificate_path.display()))?;
            let issuer = Issuer::from_ca_cert_pem(&certificate_pem, key)
                .with_context(|| format!("{}: not a certificate", certificate_path.display()))?;
            Ok((issuer, false))
        }
        (false, false) => {
            let key = KeyPair::generate().context("generating the CA's key")?;
            // Named after its key, so that two clusters' CAs differ by name and a client
            // trusting the wrong one is told the issuer is unknown.
            let id: String = key.public_key_raw()[1..5]
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            let mut params = CertificateParams::default();
            params.distinguished_name = distinguished_name(&format!("Cohort cluster CA {id}"));
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = now - Duration::minutes(5);
            params.not_after = now + Duration::days(CA_DAYS);
            let certificate = params.self_signed(&key).context("making the CA")?;
            write_new(&key_path, &key.serialize_pem(), 0o600)?;
            write_new(&certificate_path, &certificate.pem(), 0o644)?;
            Ok((Issuer::new(params, key), true))
        }
        (true, false) | (false, true) => bail!(
            "{} holds only half a CA: {CA_CERT} and {CA_KEY} go together",
            out.display()
        ),
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Writes a file that must not exist yet, with `mode` from its first byte.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
