//! TLS inside the cluster (docs/operations.md, "TLS inside the cluster").
//!
//! `manager init-cluster --tls` makes a private certificate authority and,
//! for each node, a certificate it signs; nodes serve the manager's calls
//! over TLS with theirs ([`server_config`]), and the manager trusts only
//! that authority for those calls, so an on-path attacker with a
//! certificate from any public CA is still refused. Viewers never see these
//! certificates: they reach a node's plain port, or the operator's own
//! reverse proxy with a certificate their players accept.
//!
//! ECDSA P-256 keys; certificates keep rcgen's default validity (until the
//! year 4096): a private CA has no revocation either, so what protects the
//! cluster is that its key stays off the machines, and rotating means
//! making a new CA and certificates.

use std::{path::Path, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// A private CA: its certificate (to trust) and key (to issue with).
pub struct ClusterCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its PEM private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClusterCa {
    /// A new CA named after the cluster.
    pub fn generate(name: &str) -> Result<ClusterCa, rcgen::Error> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("slmedia cluster CA {name}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(ClusterCa {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate()?)?,
        })
    }

    /// The CA certificate, PEM: what the manager trusts (`node_ca_cert`).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key, PEM (to issue a certificate for a node added
    /// later; keep it off the machines).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A server certificate for node `name`, valid for `hosts` (DNS names
    /// or IP addresses the manager uses in the node's URL).
    pub fn issue(&self, name: &str, hosts: &[String]) -> Result<Issued, rcgen::Error> {
        let mut p = CertificateParams::new(hosts.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("slmedia node {name}"));
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Why a TLS file could not be used; says which file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("the certificate and key do not go together: {0}")]
    Mismatch(String),
}

fn file_error(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// The CA certificates in a PEM file (the manager's `node_ca_cert`).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// A node's TLS server configuration from its certificate chain and key
/// (PEM files), with the ring provider; HTTP/1.1 only (what the manager
/// speaks to nodes).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Mismatch(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_loads_and_chains_to_its_ca() {
        let dir = std::env::temp_dir().join(format!("slmedia-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ClusterCa::generate("test").unwrap();
        let node = ca
            .issue("utah", &["127.0.0.1".into(), "utah.example".into()])
            .unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, &node.cert_pem).unwrap();
        std::fs::write(&key, &node.key_pem).unwrap();
        assert!(server_config(&cert, &key).is_ok());
        // A key of another certificate is refused with a clear error.
        let other = ca.issue("toronto", &["127.0.0.1".into()]).unwrap();
        std::fs::write(&key, &other.key_pem).unwrap();
        assert!(matches!(
            server_config(&cert, &key),
            Err(TlsError::Mismatch(_))
        ));
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        assert_eq!(read_certs(&ca_file).unwrap().len(), 1);
        std::fs::write(&ca_file, "not pem").unwrap();
        assert!(read_certs(&ca_file).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
