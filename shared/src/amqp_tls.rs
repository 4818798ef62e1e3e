//! Trusting a private certificate authority on `amqps://` connections.
//!
//! Clusters behind TLS often present certificates of the operator's own CA, which no public root
//! store knows. `AMQP_CA_FILE` names a PEM file of such CA certificates: it is read and checked once
//! at start (a missing or unparseable file stops the process with exit 2 naming the setting, never
//! echoing the file), and every `amqps://` connection of the process then trusts those certificates
//! in addition to the bundled webpki roots. `amqp://` connections are unaffected.

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::fmt;

/// The certificates of a private CA, as PEM text holding at least one certificate that rustls
/// accepts as a trust anchor (checked by [`ca_file`], with the parser lapin's TLS stack uses).
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedCa {
    pem: String,
    count: usize,
}

impl TrustedCa {
    /// Parses PEM text; the error says what is wrong without quoting any of it.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let mut store = RootCertStore::empty();
        let mut count = 0;
        for (index, certificate) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
            let certificate =
                certificate.map_err(|_| format!("certificate {} is not valid PEM", index + 1))?;
            store
                .add(certificate)
                .map_err(|_| format!("certificate {} is not an X.509 certificate", index + 1))?;
            count += 1;
        }
        if count == 0 {
            return Err("the file holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
        }
        Ok(Self { pem: pem.to_owned(), count })
    }

    /// The PEM text, for lapin's TLS configuration (its `cert_chain` adds to the webpki roots).
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// Certificates are public, but a log has no use for them: how many is enough.
impl fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedCa({} certificates)", self.count)
    }
}

/// `AMQP_CA_FILE`, empty meaning unset (Compose passes a variable that `.env` leaves blank as an
/// empty string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFile(pub Option<TrustedCa>);

/// Reads and checks `AMQP_CA_FILE` at start. The error names what went wrong (the file cannot be
/// read, or which certificate does not parse), never the file's contents.
pub fn ca_file(path: &str) -> Result<CaFile, String> {
    if path.trim().is_empty() {
        return Ok(CaFile(None));
    }
    let pem = std::fs::read(path).map_err(|error| format!("cannot read the file: {error}"))?;
    let pem = String::from_utf8(pem).map_err(|_| "the file is not PEM text".to_owned())?;
    TrustedCa::from_pem(&pem).map(|ca| CaFile(Some(ca)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp;
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use secrecy::SecretString;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::pki_types::PrivateKeyDer;

    /// A throwaway CA (its PEM) and a certificate for `localhost` it signed, with the key.
    fn throwaway_ca_and_localhost() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let key = PrivateKeyDer::try_from(server_key.serialize_der()).unwrap();
        (ca.pem(), server.der().clone(), key)
    }

    /// Where the local broker listens, from `AMQP_URL` as the other tests read it.
    fn broker() -> (SocketAddr, String, String) {
        let url =
            std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let uri: lapin::uri::AMQPUri = url.parse().unwrap();
        let host =
            if uri.authority.host == "localhost" { "127.0.0.1".to_owned() } else { uri.authority.host };
        let addr = format!("{host}:{}", uri.authority.port).parse().unwrap();
        (addr, uri.authority.userinfo.username, uri.authority.userinfo.password)
    }

    /// A TLS-terminating proxy on 127.0.0.1 in front of the local broker, which has no TLS
    /// listener: it presents `certificate` and forwards the plain bytes.
    async fn spawn_tls_proxy(certificate: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> u16 {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certificate], key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (target, _, _) = broker();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends the handshake: nothing to forward.
                    let Ok(mut tls) = acceptor.accept(client).await else { return };
                    let Ok(mut upstream) = TcpStream::connect(target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        port
    }

    #[test]
    fn a_missing_or_unparseable_ca_file_is_refused_without_quoting_it() {
        let error = ca_file("/nonexistent/monohook-ca.pem").unwrap_err();
        assert!(error.starts_with("cannot read the file"), "{error}");

        let dir = std::env::temp_dir().join(format!("monohook-ca-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hunter2 is not a certificate\n").unwrap();
        let error = ca_file(not_pem.to_str().unwrap()).unwrap_err();
        assert!(error.contains("no PEM certificate") && !error.contains("hunter2"), "{error}");

        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nhunter2\n-----END CERTIFICATE-----\n").unwrap();
        let error = ca_file(broken.to_str().unwrap()).unwrap_err();
        assert!(error.starts_with("certificate 1 is not") && !error.contains("hunter2"), "{error}");

        assert_eq!(ca_file("").unwrap(), CaFile(None), "empty means unset");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn amqps_to_a_broker_with_a_private_ca_connects_and_publishes_only_when_the_ca_is_trusted() {
        let (ca_pem, certificate, key) = throwaway_ca_and_localhost();
        let dir = std::env::temp_dir().join(format!("monohook-ca-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, &ca_pem).unwrap();
        let CaFile(Some(ca)) = ca_file(path.to_str().unwrap()).unwrap() else { panic!("a CA was given") };

        let port = spawn_tls_proxy(certificate, key).await;
        let (_, user, password) = broker();
        let url = SecretString::from(format!("amqps://{user}:{password}@localhost:{port}/%2f"));

        let untrusted = amqp::connect_trusting(&url, None, "monohook-test-tls").await;
        let error = untrusted.expect_err("the webpki roots do not know a throwaway CA").to_string();
        assert!(error.contains("certificate"), "a certificate error, not {error}");

        let connection =
            amqp::connect_trusting(&url, Some(&ca), "monohook-test-tls").await.expect("the CA is trusted");
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.name().as_str().into(),
                BasicPublishOptions::default(),
                b"over tls",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker confirmed the publish over TLS");
        connection.close(200, "done".into()).await.unwrap();

        // The setting as a binary reads it: from then on, every connection of the process trusts it.
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            broker: crate::config::BrokerArgs,
        }
        let matches = <Cli as clap::CommandFactory>::command().get_matches_from([
            "test",
            "--amqp-ca-file",
            path.to_str().unwrap(),
        ]);
        crate::config::apply_process_settings(&matches);
        let connection = amqp::connect(&url, "monohook-test-tls").await.expect("AMQP_CA_FILE is trusted");
        connection.close(200, "done".into()).await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
