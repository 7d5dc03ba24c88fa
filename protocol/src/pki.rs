//! The cluster's certificate authority and the certificates of its nodes and admin.
//!
//! `tandem init` calls [`init_cluster`] once to make a private CA and one certificate per
//! node plus one for the admin CLI, all as PEM files in one directory. Every process then
//! loads its own [`Identity`] from that directory. Trust is exactly "signed by this cluster's
//! CA": there is no public PKI involved.

use crate::error::{Error, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The DNS name every node certificate carries and every client verifies, so that clients
/// can verify a node without knowing the node's own name.
pub const NODE_SERVER_NAME: &str = "tandem-node";

/// The DNS name in the admin certificate; it identifies the CLI and is never a server name.
pub const ADMIN_CERTIFICATE_NAME: &str = "tandem-admin";

/// The identity name of the admin CLI, whose files are `admin.pem` and `admin.key`.
pub const ADMIN_NAME: &str = "admin";

/// The file stem of the CA's files, `ca.pem` and `ca.key`.
const CA_NAME: &str = "ca";

/// Node names become DNS names, file names and labels in logs, so they are kept short.
pub const NODE_NAME_BYTES_MAX: usize = 63;

/// How many years before the current one certificates become valid. Starting a year early
/// tolerates clocks that lag behind and the rough year arithmetic below.
const VALIDITY_START_YEARS_BEFORE: i32 = 1;

/// How many years after the current one certificates stay valid. tandem has no rotation
/// tooling yet, so certificates are made to outlive any reasonable cluster lifetime rather
/// than expire silently under a running cluster.
const VALIDITY_END_YEARS_AFTER: i32 = 20;

/// The files written by [`init_cluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterFiles {
    pub directory: PathBuf,
    pub ca_certificate: PathBuf,
    pub ca_key: PathBuf,
    pub nodes: Vec<IdentityFiles>,
    pub admin: IdentityFiles,
}

/// The certificate and key files of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub name: String,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A certificate, its private key, and the cluster CA to verify peers against.
pub struct Identity {
    pub ca_cert_der: CertificateDer<'static>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub private_key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            ca_cert_der: self.ca_cert_der.clone(),
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    /// Leaves the private key out, so an identity can be logged without leaking it.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Identity")
            .field("ca_cert_der_bytes", &self.ca_cert_der.len())
            .field("cert_chain_length", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the identity `name` (a node name or `admin`) from `dir`: `ca.pem`, `NAME.pem`
    /// and `NAME.key`.
    pub fn load(dir: &Path, name: &str) -> Result<Identity> {
        if name != ADMIN_NAME {
            validate_node_name(name).map_err(|detail| certificates_error(dir, detail))?;
        }
        let ca_path = dir.join(format!("{CA_NAME}.pem"));
        let ca_certificates = read_certificates(&ca_path)?;
        let Some(ca_cert_der) = ca_certificates.into_iter().next() else {
            return Err(certificates_error(
                &ca_path,
                "holds no certificate".to_owned(),
            ));
        };
        let certificate_path = dir.join(format!("{name}.pem"));
        let cert_chain = read_certificates(&certificate_path)?;
        if cert_chain.is_empty() {
            return Err(certificates_error(
                &certificate_path,
                "holds no certificate".to_owned(),
            ));
        }
        let key_path = dir.join(format!("{name}.key"));
        let key_pem = read_file(&key_path)?;
        let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
            certificates_error(&key_path, format!("holds no usable private key: {error}"))
        })?;
        Ok(Identity {
            ca_cert_der,
            cert_chain,
            private_key,
        })
    }
}

fn certificates_error(path: &Path, detail: String) -> Error {
    Error::Certificates {
        path: path.display().to_string(),
        detail,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|error| {
        let detail = if error.kind() == std::io::ErrorKind::NotFound {
            "is missing; `tandem init` makes the cluster's certificates and keys".to_owned()
        } else {
            format!("cannot be read: {error}")
        };
        certificates_error(path, detail)
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(path)?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| certificates_error(path, format!("is not valid PEM: {error}")))
}

/// Checks that `name` can name a node: `[A-Za-z0-9][A-Za-z0-9_-]{0,62}` and not a name
/// reserved for the CA or the admin.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return Err("a node name must not be empty".to_owned());
    };
    if name.len() > NODE_NAME_BYTES_MAX {
        return Err(format!(
            "node name '{name}' is longer than {NODE_NAME_BYTES_MAX} bytes"
        ));
    }
    let allowed = first.is_ascii_alphanumeric()
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if !allowed {
        return Err(format!(
            "node name '{name}' must start with a letter or digit and contain only \
             letters, digits, '_' and '-'"
        ));
    }
    if name == ADMIN_NAME
        || name == CA_NAME
        || name == NODE_SERVER_NAME
        || name == ADMIN_CERTIFICATE_NAME
    {
        return Err(format!(
            "node name '{name}' is reserved for the cluster's own files and certificate names; choose another"
        ));
    }
    Ok(())
}

/// One generated certificate and key, ready to be written.
struct GeneratedFiles {
    certificate_path: PathBuf,
    certificate_pem: String,
    key_path: PathBuf,
    key_pem: String,
}

/// Creates the cluster CA and the certificates of `node_names` and the admin in `dir`.
///
/// Nothing is written unless every name is valid and none of the files exists yet, so a
/// refused call leaves the directory as it was.
pub fn init_cluster(dir: &Path, node_names: &[String]) -> Result<ClusterFiles> {
    if node_names.is_empty() {
        return Err(certificates_error(
            dir,
            "no node names given; name at least one node".to_owned(),
        ));
    }
    let mut seen = HashSet::new();
    for name in node_names {
        validate_node_name(name).map_err(|detail| certificates_error(dir, detail))?;
        if !seen.insert(name.as_str()) {
            return Err(certificates_error(
                dir,
                format!("node name '{name}' is given more than once"),
            ));
        }
    }

    let ca_key_path = dir.join(format!("{CA_NAME}.key"));
    if ca_key_path.exists() {
        return Err(certificates_error(
            &ca_key_path,
            "already exists, so this directory already holds a cluster CA; refusing to \
             replace it because every certificate it signed would stop being trusted. Use \
             another directory, or move this one away first if you really want a new cluster"
                .to_owned(),
        ));
    }

    let ca_key = KeyPair::generate().map_err(tls_generation_error)?;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(tls_generation_error)?;
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tandem cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    apply_validity_period(&mut ca_params);
    let ca_certificate = ca_params
        .self_signed(&ca_key)
        .map_err(tls_generation_error)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut generated = vec![GeneratedFiles {
        certificate_path: dir.join(format!("{CA_NAME}.pem")),
        certificate_pem: ca_certificate.pem(),
        key_path: ca_key_path.clone(),
        key_pem: ca_key.serialize_pem(),
    }];
    let mut nodes = Vec::with_capacity(node_names.len());
    for name in node_names {
        let files = generate_leaf(
            dir,
            &issuer,
            name,
            vec![name.clone(), NODE_SERVER_NAME.to_owned()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        nodes.push(IdentityFiles {
            name: name.clone(),
            certificate: files.certificate_path.clone(),
            key: files.key_path.clone(),
        });
        generated.push(files);
    }
    let admin_files = generate_leaf(
        dir,
        &issuer,
        ADMIN_NAME,
        vec![ADMIN_CERTIFICATE_NAME.to_owned()],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    let admin = IdentityFiles {
        name: ADMIN_NAME.to_owned(),
        certificate: admin_files.certificate_path.clone(),
        key: admin_files.key_path.clone(),
    };
    generated.push(admin_files);

    for files in &generated {
        for path in [&files.certificate_path, &files.key_path] {
            if path.exists() {
                return Err(certificates_error(
                    path,
                    "already exists; refusing to overwrite it. Use an empty directory for \
                     `tandem init`"
                        .to_owned(),
                ));
            }
        }
    }

    create_private_directory(dir)?;
    for files in &generated {
        write_new_file(&files.certificate_path, &files.certificate_pem, 0o644)?;
        write_new_file(&files.key_path, &files.key_pem, 0o600)?;
    }

    Ok(ClusterFiles {
        directory: dir.to_path_buf(),
        ca_certificate: dir.join(format!("{CA_NAME}.pem")),
        ca_key: ca_key_path,
        nodes,
        admin,
    })
}

fn tls_generation_error(error: rcgen::Error) -> Error {
    Error::Tls {
        detail: format!("could not generate a certificate: {error}"),
    }
}

/// Makes a key and a certificate for `common_name`, signed by the CA.
fn generate_leaf(
    dir: &Path,
    issuer: &Issuer<'_, &KeyPair>,
    common_name: &str,
    dns_names: Vec<String>,
    extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
) -> Result<GeneratedFiles> {
    let key = KeyPair::generate().map_err(tls_generation_error)?;
    let mut params = CertificateParams::new(dns_names).map_err(tls_generation_error)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = extended_key_usages;
    params.use_authority_key_identifier_extension = true;
    apply_validity_period(&mut params);
    let certificate = params
        .signed_by(&key, issuer)
        .map_err(tls_generation_error)?;
    Ok(GeneratedFiles {
        certificate_path: dir.join(format!("{common_name}.pem")),
        certificate_pem: certificate.pem(),
        key_path: dir.join(format!("{common_name}.key")),
        key_pem: key.serialize_pem(),
    })
}

/// Seconds in an average Gregorian year, for turning the clock into a calendar year.
const GREGORIAN_YEAR_SECONDS: u64 = 31_556_952;

/// Sets the validity period of a new certificate, from January 1st some years back to
/// January 1st some years ahead.
fn apply_validity_period(params: &mut CertificateParams) {
    let seconds_since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let years_since_epoch =
        i32::try_from(seconds_since_epoch / GREGORIAN_YEAR_SECONDS).unwrap_or(0);
    // Clamped so that a wildly wrong clock cannot produce a date the calendar code rejects.
    let current_year = 1970_i32.saturating_add(years_since_epoch).clamp(1971, 9000);
    params.not_before = rcgen::date_time_ymd(current_year - VALIDITY_START_YEARS_BEFORE, 1, 1);
    params.not_after = rcgen::date_time_ymd(current_year + VALIDITY_END_YEARS_AFTER, 1, 1);
}

/// Creates `dir` when it does not exist, readable only by its owner because it will hold
/// private keys; an existing directory is left as it is.
fn create_private_directory(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|error| certificates_error(dir, format!("cannot create the directory: {error}")))
}

/// Writes `contents` to a file that must not exist yet, with `mode` set at creation so a
/// private key is never readable by others, not even briefly.
fn write_new_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .map_err(|error| certificates_error(path, format!("cannot be created: {error}")))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|error| certificates_error(path, format!("cannot be written: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn init_writes_every_file_and_identities_load_back() {
        let temporary = tempfile::tempdir().unwrap();
        let dir = temporary.path().join("pki");
        let files = init_cluster(&dir, &names(&["node-a", "node_b"])).unwrap();
        assert_eq!(files.ca_key, dir.join("ca.key"));
        assert_eq!(files.nodes.len(), 2);
        for file in [
            "ca.pem",
            "ca.key",
            "node-a.pem",
            "node-a.key",
            "node_b.pem",
            "node_b.key",
            "admin.pem",
            "admin.key",
        ] {
            assert!(dir.join(file).is_file(), "{file} is missing");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in ["ca.key", "node-a.key", "admin.key"] {
                let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{key} has mode {mode:o}");
            }
        }
        for name in ["node-a", "node_b", "admin"] {
            let identity = Identity::load(&dir, name).unwrap();
            assert_eq!(identity.cert_chain.len(), 1);
            assert_ne!(identity.cert_chain[0], identity.ca_cert_der);
        }
    }

    #[test]
    fn bad_and_reserved_names_are_refused() {
        let temporary = tempfile::tempdir().unwrap();
        let long_name = "a".repeat(NODE_NAME_BYTES_MAX + 1);
        for bad in [
            "",
            "admin",
            "ca",
            "-leading-hyphen",
            "_leading",
            "has space",
            "dot.ted",
            "slash/ed",
            "..",
            "ünïcode",
            long_name.as_str(),
        ] {
            let result = init_cluster(temporary.path(), &names(&[bad]));
            assert!(
                matches!(result, Err(Error::Certificates { .. })),
                "'{bad}' was accepted"
            );
        }
        assert!(validate_node_name(&"a".repeat(NODE_NAME_BYTES_MAX)).is_ok());
        assert!(validate_node_name("0-node_9").is_ok());
        assert!(fs::read_dir(temporary.path()).unwrap().next().is_none());
    }

    #[test]
    fn empty_and_duplicate_name_lists_are_refused() {
        let temporary = tempfile::tempdir().unwrap();
        assert!(matches!(
            init_cluster(temporary.path(), &[]),
            Err(Error::Certificates { .. })
        ));
        match init_cluster(temporary.path(), &names(&["one", "two", "one"])) {
            Err(Error::Certificates { detail, .. }) => assert!(detail.contains("more than once")),
            other => panic!("duplicates were accepted: {other:?}"),
        }
        assert!(fs::read_dir(temporary.path()).unwrap().next().is_none());
    }

    #[test]
    fn an_existing_ca_key_is_never_overwritten() {
        let temporary = tempfile::tempdir().unwrap();
        init_cluster(temporary.path(), &names(&["one"])).unwrap();
        let ca_key_before = fs::read(temporary.path().join("ca.key")).unwrap();
        match init_cluster(temporary.path(), &names(&["two"])) {
            Err(Error::Certificates { path, detail }) => {
                assert!(path.ends_with("ca.key"), "{path}");
                assert!(detail.contains("already exists"), "{detail}");
            }
            other => panic!("the CA was replaced: {other:?}"),
        }
        assert_eq!(
            fs::read(temporary.path().join("ca.key")).unwrap(),
            ca_key_before
        );
        assert!(!temporary.path().join("two.pem").exists());
    }

    #[test]
    fn other_existing_files_are_never_overwritten() {
        let temporary = tempfile::tempdir().unwrap();
        fs::write(temporary.path().join("admin.pem"), "keep me").unwrap();
        match init_cluster(temporary.path(), &names(&["one"])) {
            Err(Error::Certificates { path, .. }) => assert!(path.ends_with("admin.pem")),
            other => panic!("admin.pem was overwritten: {other:?}"),
        }
        assert_eq!(
            fs::read_to_string(temporary.path().join("admin.pem")).unwrap(),
            "keep me"
        );
        assert!(!temporary.path().join("ca.key").exists());
    }

    #[test]
    fn missing_files_name_the_file_and_the_remedy() {
        let temporary = tempfile::tempdir().unwrap();
        init_cluster(temporary.path(), &names(&["one"])).unwrap();
        fs::remove_file(temporary.path().join("one.key")).unwrap();
        match Identity::load(temporary.path(), "one") {
            Err(Error::Certificates { path, detail }) => {
                assert!(path.ends_with("one.key"), "{path}");
                assert!(detail.contains("tandem init"), "{detail}");
            }
            other => panic!("expected a missing-file error, got {other:?}"),
        }
        assert!(matches!(
            Identity::load(temporary.path(), "../one"),
            Err(Error::Certificates { .. })
        ));
    }
}
