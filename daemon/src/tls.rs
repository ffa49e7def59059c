//! The TCP listener's TLS: its certificate chain and key from PEM files
//! (rustls on the ring provider), checked at start so that a file that
//! cannot be used stops `kiln serve` with an error naming it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_api::tls::{provider, read_certs, read_key, ALPN_HTTP1};

/// The server configuration of `--tls-cert CERT --tls-key KEY`: CERT holds
/// the daemon's certificate first, then any intermediates; KEY its key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let chain = read_certs("TLS certificate (--tls-cert)", cert)?;
    let key_der = read_key("TLS key (--tls-key)", key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("the TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .with_context(|| {
            format!(
                "the TLS key {} does not go with the certificate {}",
                key.display(),
                cert.display()
            )
        })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}
