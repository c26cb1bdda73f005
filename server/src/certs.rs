//! TLS certificates: a development CA and server certificate for trying the
//! service, and loading real ones from PEM files.
//!
//! Development layout (what `chat-server gen-certs --out DIR` writes, and
//! what the server creates under `<data-dir>/certs/` on first start when no
//! certificate is configured):
//!
//! * `ca.pem`: the development CA; clients trust this file.
//! * `ca-key.pem`: its key (mode 0600), to issue more server certificates.
//! * `server.pem`, `server-key.pem`: the server's certificate (signed by
//!   the CA, valid for `localhost`, `127.0.0.1` and `::1` by default) and key.
//!
//! These are for development only: anyone with `ca-key.pem` can
//! impersonate the server to clients that trust `ca.pem`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::Config;

/// Names a dev server certificate is valid for when none are given.
pub const DEFAULT_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// The CA file clients trust, in a dev certificate directory.
pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const SERVER_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server-key.pem";

/// Certificate work that failed, with the file involved.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CertError(pub String);

/// A development CA and a server certificate it signed, as PEM.
pub struct DevCerts {
    /// CA certificate.
    pub ca_pem: String,
    /// CA private key.
    pub ca_key_pem: String,
    /// Server certificate.
    pub server_pem: String,
    /// Server private key.
    pub server_key_pem: String,
}

impl DevCerts {
    /// Creates a new CA and a server certificate for `names` (DNS names or
    /// IP addresses).
    pub fn generate(names: &[String]) -> Result<DevCerts, CertError> {
        let fail = |what: &str, e: rcgen::Error| CertError(format!("{what}: {e}"));
        let ca_key = KeyPair::generate().map_err(|e| fail("generate CA key", e))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA params", e))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.distinguished_name.push(
            DnType::CommonName,
            "chat-server development CA (not for production)",
        );
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|e| fail("self-sign CA", e))?;

        let server_key = KeyPair::generate().map_err(|e| fail("generate server key", e))?;
        let mut server_params = CertificateParams::new(names.to_vec())
            .map_err(|e| fail("server certificate names", e))?;
        server_params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("localhost", String::as_str),
        );
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = Issuer::new(ca_params, &ca_key);
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .map_err(|e| fail("sign server certificate", e))?;
        Ok(DevCerts {
            ca_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            server_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
        })
    }

    /// Writes the four files into `dir` (created if needed). Keys are
    /// readable by the owner only from the moment they are created, and
    /// no existing file is replaced: overwriting a CA would make every
    /// copy of `ca.pem` handed out stop working.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| CertError(format!("create {}: {e}", dir.display())))?;
        for name in [CA_FILE, CA_KEY_FILE, SERVER_FILE, SERVER_KEY_FILE] {
            if dir.join(name).exists() {
                return Err(CertError(format!(
                    "{} exists; remove it (and the rest of the set) to make new ones",
                    dir.join(name).display()
                )));
            }
        }
        self.write_files(dir)
    }

    /// Writes the set as the new directory `dir`, all or nothing: the
    /// files go to a directory of their own beside it, which is then
    /// renamed. False if `dir` appeared meanwhile (another process made
    /// its set first; use that one).
    fn write_as_dir(&self, dir: &Path) -> Result<bool, CertError> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .map_err(|e| CertError(format!("create {}: {e}", parent.display())))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let staged = parent.join(format!(".certs-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&staged)
            .map_err(|e| CertError(format!("create {}: {e}", staged.display())))?;
        if let Err(e) = self.write_files(&staged) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e);
        }
        match std::fs::rename(&staged, dir) {
            Ok(()) => Ok(true),
            Err(_) if std::fs::read_dir(dir).is_ok_and(|mut e| e.next().is_none()) => {
                // An empty directory that cannot be replaced (a mount
                // point): the files go into it, none replaced.
                let _ = std::fs::remove_dir_all(&staged);
                self.write_files(dir)?;
                Ok(true)
            }
            Err(_) if dir.join(SERVER_FILE).exists() => {
                let _ = std::fs::remove_dir_all(&staged);
                Ok(false)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staged);
                Err(CertError(format!(
                    "move the new certificates to {}: {e}",
                    dir.display()
                )))
            }
        }
    }

    fn write_files(&self, dir: &Path) -> Result<(), CertError> {
        write_file(&dir.join(CA_FILE), &self.ca_pem, false)?;
        write_file(&dir.join(CA_KEY_FILE), &self.ca_key_pem, true)?;
        write_file(&dir.join(SERVER_FILE), &self.server_pem, false)?;
        write_file(&dir.join(SERVER_KEY_FILE), &self.server_key_pem, true)?;
        Ok(())
    }
}

/// Creates `path` (which must not exist) with `contents`, synced; a
/// secret is created readable by the owner only (0600), never wider.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let fail = |e: std::io::Error| CertError(format!("write {}: {e}", path.display()));
    let mut file = options.open(path).map_err(fail)?;
    file.write_all(contents.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

/// The certificate every new handshake is answered with, replaceable while
/// the node runs ([`crate::Server::reload_certificate`], which SIGHUP
/// calls): a renewed certificate takes effect without a restart, and open
/// connections keep the one they began with.
#[derive(Debug)]
pub struct CertificateSlot {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertificateSlot {
    /// A slot holding `identity`, its key loaded by `provider`.
    pub fn new(identity: ServerIdentity, provider: Arc<CryptoProvider>) -> Result<Self, CertError> {
        let current = RwLock::new(Arc::new(certified(identity, &provider)?));
        Ok(CertificateSlot { provider, current })
    }

    /// Presents `identity` from the next handshake on. An identity whose
    /// key does not match its certificate is refused, and the current one
    /// stays.
    pub fn replace(&self, identity: ServerIdentity) -> Result<(), CertError> {
        let key = Arc::new(certified(identity, &self.provider)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn certified(
    identity: ServerIdentity,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertError> {
    CertifiedKey::from_der(identity.chain, identity.key, provider)
        .map_err(|e| CertError(format!("certificate and key: {e}")))
}

/// The configured certificate, or the dev certificate under the data
/// directory, as they are on disk now (for a reload: nothing is created).
pub fn load(config: &Config) -> Result<ServerIdentity, CertError> {
    if let (Some(cert), Some(key)) = (&config.tls.tls_cert, &config.tls.tls_key) {
        return Ok(ServerIdentity {
            chain: load_chain(cert)?,
            key: load_key(key)?,
            dev_ca: None,
        });
    }
    let dir = config.data_dir.join("certs");
    Ok(ServerIdentity {
        chain: load_chain(&dir.join(SERVER_FILE))?,
        key: load_key(&dir.join(SERVER_KEY_FILE))?,
        dev_ca: Some(dir.join(CA_FILE)),
    })
}

/// The certificate chain and key the server presents.
pub struct ServerIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
    /// Where a client finds the CA to trust, when it is a dev CA.
    pub dev_ca: Option<PathBuf>,
}

impl ServerIdentity {
    /// When the chain stops being accepted: the earliest `notAfter` among
    /// its certificates, in seconds since the Unix epoch (negative before
    /// 1970). An intermediate that expires first ends the chain's life as
    /// surely as the leaf.
    pub fn expires_at(&self) -> Result<i64, CertError> {
        self.chain
            .iter()
            .enumerate()
            .map(|(i, der)| {
                x509_parser::parse_x509_certificate(der)
                    .map(|(_, cert)| cert.validity().not_after.timestamp())
                    .map_err(|e| CertError(format!("certificate {} of the chain: {e}", i + 1)))
            })
            .try_fold(i64::MAX, |earliest, at| Ok(earliest.min(at?)))
    }
}

/// Loads the configured certificate, or the dev certificate under the data
/// directory, creating it (with a warning) if it does not exist yet.
pub fn load_or_create(config: &Config) -> Result<ServerIdentity, CertError> {
    if config.tls.tls_cert.is_some() && config.tls.tls_key.is_some() {
        return load(config);
    }
    let dir = config.data_dir.join("certs");
    let names: Vec<String> = DEFAULT_NAMES.iter().map(|s| s.to_string()).collect();
    // An empty directory (made by hand, or a volume mounted there) counts
    // as none: the set is renamed onto it, or, where it cannot be (a mount
    // point), written into it file by file.
    let empty = std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_none());
    if (!dir.exists() || empty) && DevCerts::generate(&names)?.write_as_dir(&dir)? {
        tracing::warn!(
            dir = %dir.display(),
            "created a DEVELOPMENT CA and server certificate; clients must trust {}. \
             Do not use these in production: set tls-cert and tls-key",
            dir.join(CA_FILE).display()
        );
    } else {
        // A set is whole or absent (made as one directory); a directory
        // missing one names it rather than failing on a half-read key.
        for name in [CA_FILE, SERVER_FILE, SERVER_KEY_FILE] {
            if !dir.join(name).exists() {
                return Err(CertError(format!(
                    "{} is missing from the development certificates in {}: remove the directory to make new ones",
                    name,
                    dir.display()
                )));
            }
        }
        tracing::warn!(
            ca = %dir.join(CA_FILE).display(),
            "using the DEVELOPMENT certificate from the data directory; set tls-cert and tls-key for production"
        );
    }
    load(config)
}

/// Reads every certificate in a PEM file.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| CertError(format!("read certificates from {}: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(CertError(format!(
            "no certificate found in {}",
            path.display()
        )));
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| CertError(format!("read private key from {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for localhost that expires on `year`-05-06.
    fn expiring(year: i32) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 5, 6);
        params.self_signed(&key).unwrap().der().clone()
    }

    fn identity(chain: Vec<CertificateDer<'static>>) -> ServerIdentity {
        let key = KeyPair::generate().unwrap();
        ServerIdentity {
            chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            dev_ca: None,
        }
    }

    #[test]
    fn a_chain_expires_with_its_earliest_certificate() {
        // 2031-05-06T00:00:00Z and 2040-05-06T00:00:00Z.
        assert_eq!(
            identity(vec![expiring(2031)]).expires_at().unwrap(),
            1_935_792_000
        );
        assert_eq!(
            identity(vec![expiring(2040)]).expires_at().unwrap(),
            2_219_875_200
        );
        // An intermediate that ends first ends the chain, in either place.
        assert_eq!(
            identity(vec![expiring(2040), expiring(2031)])
                .expires_at()
                .unwrap(),
            1_935_792_000
        );
        assert_eq!(
            identity(vec![expiring(2031), expiring(2040)])
                .expires_at()
                .unwrap(),
            1_935_792_000
        );
        // Long expired: 1990-05-06.
        assert_eq!(
            identity(vec![expiring(1990)]).expires_at().unwrap(),
            641_952_000
        );
        // Bytes that are no certificate name their place in the chain.
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = identity(vec![expiring(2040), garbage])
            .expires_at()
            .unwrap_err();
        assert!(err.0.contains("certificate 2 of the chain"), "{err}");
    }

    #[test]
    fn generate_write_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        DevCerts::generate(&names)
            .unwrap()
            .write(dir.path())
            .unwrap();
        assert_eq!(load_chain(&dir.path().join(SERVER_FILE)).unwrap().len(), 1);
        assert_eq!(load_chain(&dir.path().join(CA_FILE)).unwrap().len(), 1);
        load_key(&dir.path().join(SERVER_KEY_FILE)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let first = load_or_create(&config).unwrap();
        let second = load_or_create(&config).unwrap();
        assert_eq!(first.chain, second.chain);
        assert!(first.dev_ca.unwrap().ends_with("certs/ca.pem"));
    }

    #[test]
    fn written_sets_are_never_replaced_and_keys_are_never_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let first = DevCerts::generate(&names).unwrap();
        first.write(dir.path()).unwrap();
        let again = DevCerts::generate(&names).unwrap().write(dir.path());
        assert!(again.unwrap_err().0.contains("exists"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap(),
            first.ca_pem
        );
        // Made as one directory: a second maker finds the first's set.
        let certs = dir.path().join("data/certs");
        assert!(first.write_as_dir(&certs).unwrap());
        let second = DevCerts::generate(&names).unwrap();
        assert!(!second.write_as_dir(&certs).unwrap());
        assert_eq!(
            std::fs::read_to_string(certs.join(SERVER_FILE)).unwrap(),
            first.server_pem
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("certs")]);
    }

    #[test]
    fn an_empty_certificate_directory_counts_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let identity = load_or_create(&config).unwrap();
        assert_eq!(identity.chain.len(), 1);
    }

    #[test]
    fn an_incomplete_set_is_named_not_half_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        load_or_create(&config).unwrap();
        std::fs::remove_file(dir.path().join("certs").join(SERVER_KEY_FILE)).unwrap();
        let err = load_or_create(&config).err().unwrap();
        assert!(err.0.contains("server-key.pem is missing"), "{}", err.0);
    }

    #[test]
    fn missing_files_name_the_path() {
        let err = load_chain(Path::new("/nonexistent/chain.pem")).unwrap_err();
        assert!(err.0.contains("/nonexistent/chain.pem"), "{}", err.0);
    }
}
