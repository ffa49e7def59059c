//! TLS on the API's TCP transport, with rustls on the ring provider: PEM
//! certificates and keys read from files (for the daemon's listener and
//! the client's trusted CA), and the client's connector.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The one protocol both sides speak inside TLS.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A PEM file that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {what} file {} is not valid PEM: {detail}", path.display())]
    Malformed {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("the {what} file {} holds no {expected}", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, PemFileError> {
    std::fs::read(path).map_err(|source| PemFileError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate (`BEGIN CERTIFICATE`) of a PEM file, in order; at least one.
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let pem = read_pem(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemFileError::Malformed {
            what,
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemFileError::Empty {
            what,
            path: path.to_owned(),
            expected: "certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn read_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, PemFileError> {
    let pem = read_pem(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => PemFileError::Empty {
            what,
            path: path.to_owned(),
            expected: "private key (-----BEGIN PRIVATE KEY-----, RSA or EC PRIVATE KEY)",
        },
        e => PemFileError::Malformed {
            what,
            path: path.to_owned(),
            detail: e.to_string(),
        },
    })
}

/// The ring crypto provider (the only one Kiln builds with).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS client configuration cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error(transparent)]
    File(#[from] PemFileError),
    #[error("the CA file {}: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("no trusted CA certificates on this system; give the daemon's CA with --ca-cert (KILN_CA_CERT)")]
    NoSystemRoots,
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The client's TLS configuration: trusting only the certificates of
/// `ca_cert` when given (a daemon with a self-signed certificate gives that
/// certificate itself), else the system's trusted CAs.
pub fn client_config(ca_cert: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            for cert in read_certs("CA certificate", path)? {
                roots.add(cert).map_err(|source| ClientTlsError::BadCa {
                    path: path.to_owned(),
                    source,
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(ClientTlsError::NoSystemRoots);
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// The host part of `host:port` (`[v6]:port` gives `v6`), as the name the
/// daemon's certificate must carry (a DNS name or an IP address).
pub fn server_name(addr: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    let host = if let Some(rest) = addr.strip_prefix('[') {
        rest.split_once(']').map(|(h, _)| h).unwrap_or(rest)
    } else {
        addr.rsplit_once(':').map_or(addr, |(h, _)| h)
    };
    rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is not a host name TLS can check: {e}"))
}

/// A handshake error, with what to do about the ones a user can fix.
pub fn explain(message: String) -> String {
    let hint = if message.contains("CaUsedAsEndEntity") {
        "the daemon's certificate is a CA certificate (basicConstraints CA:TRUE, \
         openssl req -x509's default): make it with -addext basicConstraints=critical,CA:FALSE \
         (docs/api.md)"
    } else if message.contains("UnknownIssuer") {
        "give the CA that signed the daemon's certificate (or that certificate, if \
         self-signed) with --ca-cert or KILN_CA_CERT"
    } else if message.contains("not valid for name") {
        "reach the daemon by a name or address its certificate carries"
    } else {
        return message;
    };
    format!("{message}: {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_host_part() {
        assert_eq!(
            server_name("127.0.0.1:8443").unwrap(),
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("[::1]:8443").unwrap(),
            rustls::pki_types::ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            server_name("kiln.example:443").unwrap(),
            rustls::pki_types::ServerName::try_from("kiln.example").unwrap()
        );
        assert!(server_name("bad host:1").is_err());
    }

    #[test]
    fn pem_files_that_cannot_be_used_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read_certs("TLS certificate", &missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let err = read_certs("TLS certificate", &empty).unwrap_err();
        assert!(
            err.to_string().contains("empty.pem") && err.to_string().contains("no certificate"),
            "{err}"
        );
        let err = read_key("TLS key", &empty).unwrap_err();
        assert!(err.to_string().contains("no private key"), "{err}");
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!!\n").unwrap();
        let err = read_certs("TLS certificate", &broken).unwrap_err();
        assert!(err.to_string().contains("broken.pem"), "{err}");
        let err = client_config(Some(&empty)).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }
}
