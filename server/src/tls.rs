//! TLS for the server and its clients (rustls): the server proves who it is to every client;
//! with a client CA it also checks each client's certificate, and with an allow-list only the
//! clients whose certificate names an allowed common name or URI SAN are served (as Typha
//! does).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// An error in TLS settings.
#[derive(Debug, thiserror::Error)]
#[error("tls {what}: {reason}")]
pub struct TlsError {
    what: &'static str,
    reason: String,
}

fn err(what: &'static str, reason: impl ToString) -> TlsError {
    TlsError {
        what,
        reason: reason.to_string(),
    }
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(what, e))?;
    if certs.is_empty() {
        return Err(err(what, "no certificate in the PEM"));
    }
    Ok(certs)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| err("key", e))
}

fn roots(pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("ca", pem)? {
        roots.add(c).map_err(|e| err("ca", e))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS: its certificate and key (PEM); optionally a CA that client certificates
/// must chain to, and the names (common name or URI SAN) a client certificate must carry.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerTls {
    /// The certificate chain, PEM.
    pub cert: Vec<u8>,
    /// The private key, PEM.
    pub key: Vec<u8>,
    /// Client certificates must chain to this CA (PEM): mutual TLS.
    pub client_ca: Option<Vec<u8>>,
    /// With `client_ca`: only clients whose certificate's common name or a URI SAN is one of
    /// these are served (empty: any client the CA signed).
    pub allowed_clients: Vec<String>,
}

impl ServerTls {
    /// TLS with this certificate and key; clients are not asked for certificates.
    pub fn new(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        ServerTls {
            cert: cert_pem.into(),
            key: key_pem.into(),
            client_ca: None,
            allowed_clients: Vec::new(),
        }
    }

    /// Mutual TLS: client certificates must chain to `ca_pem` and name one of `allowed` (any
    /// name when it is empty).
    #[must_use]
    pub fn with_client_auth(mut self, ca_pem: impl Into<Vec<u8>>, allowed: Vec<String>) -> Self {
        self.client_ca = Some(ca_pem.into());
        self.allowed_clients = allowed;
        self
    }

    pub(crate) fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("config", e))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| err("client ca", e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs("cert", &self.cert)?, key(&self.key)?)
            .map_err(|e| err("cert", e))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// Why a client whose certificate chain is `peer` is not served, if it is not.
    pub(crate) fn refuse(&self, peer: Option<&[CertificateDer<'_>]>) -> Option<String> {
        if self.client_ca.is_none() || self.allowed_clients.is_empty() {
            return None;
        }
        let Some(leaf) = peer.and_then(<[_]>::first) else {
            return Some("no client certificate".into());
        };
        let names = match names_of(leaf) {
            Ok(n) => n,
            Err(e) => return Some(format!("an unreadable client certificate: {e}")),
        };
        if names.iter().any(|n| self.allowed_clients.contains(n)) {
            None
        } else {
            Some(format!(
                "the client certificate ({}) is not in the allow-list",
                names.join(", ")
            ))
        }
    }
}

/// The common names and URI SANs of a certificate.
fn names_of(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = n {
                names.push((*uri).to_owned());
            }
        }
    }
    Ok(names)
}

/// A client's TLS: the CA the server's certificate must chain to, the name to check it
/// against, and optionally the client's own certificate and key (mutual TLS).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientTls {
    /// The CA, PEM.
    pub ca: Vec<u8>,
    /// The server's name in its certificate (a DNS name or an IP address).
    pub server_name: String,
    /// The client's certificate chain and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Verifies the server against `ca_pem`, by `server_name`.
    pub fn new(ca_pem: impl Into<Vec<u8>>, server_name: impl Into<String>) -> Self {
        ClientTls {
            ca: ca_pem.into(),
            server_name: server_name.into(),
            identity: None,
        }
    }

    /// Presents this certificate and key to the server.
    #[must_use]
    pub fn with_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    pub(crate) fn connector(
        &self,
    ) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("config", e))?
            .with_root_certificates(roots(&self.ca)?);
        let config = match &self.identity {
            Some((cert, k)) => builder
                .with_client_auth_cert(certs("cert", cert)?, key(k)?)
                .map_err(|e| err("cert", e))?,
            None => builder.with_no_client_auth(),
        };
        let name =
            ServerName::try_from(self.server_name.clone()).map_err(|e| err("server name", e))?;
        Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    }
}
