//! The chat-server example over TLS (`--tls-cert`, `--tls-key`): a client that trusts a private
//! CA made by this test chats over `wss://`; plain `ws://` to the TLS port and a client that
//! does not trust the CA fail cleanly, a socket that never starts TLS is closed at the
//! handshake deadline, and the server goes on.
//!
//! Run with `cargo build --example chat-server --all-features && cargo test --test tls`.

use std::sync::Arc;
use std::time::Duration;

use chatbus_testkit::chat::chat_server_program;
use chatbus_testkit::{free_port, wait_for_port};
use futures::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// A CA, and a certificate for `localhost` and 127.0.0.1 signed by it, written as PEM files.
struct Pki {
    ca: CertificateDer<'static>,
    dir: tempfile::TempDir,
}

fn make_pki() -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "chatbus test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("write key");
    Pki {
        ca: ca_cert.der().clone(),
        dir,
    }
}

fn connector(trusted: Option<&CertificateDer<'static>>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = trusted {
        roots.add(ca.clone()).expect("CA into the root store");
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_stream(
    port: u16,
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

async fn next_frame<S>(ws: &mut S) -> serde_json::Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).expect("JSON"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn chat_over_tls_with_a_private_ca_and_plain_ws_fails_cleanly() {
    let pki = make_pki();
    let port = free_port();
    let mut server = tokio::process::Command::new(chat_server_program())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(pki.dir.path().join("cert.pem"))
        .arg("--tls-key")
        .arg(pki.dir.path().join("key.pem"))
        .args(["--handshake-timeout-secs", "1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chat-server");
    wait_for_port(port, Duration::from_secs(30), "chat-server (TLS)").await;

    // A socket that never starts its TLS handshake is closed at the handshake deadline.
    let mut silent = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("a silent TLS socket is closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed, not answered: {read:?}"
    );

    // Plain ws:// to the TLS port: an error, not a hang.
    let plain = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws?name=plain")),
    )
    .await
    .expect("plain ws:// ends in time");
    assert!(plain.is_err(), "plain ws:// to the TLS port must fail");

    // A client that does not trust the CA refuses the server.
    assert!(
        tls_stream(port, &connector(None)).await.is_err(),
        "an untrusting client must fail the handshake"
    );

    // A client that trusts the private CA chats over wss://.
    let trusting = connector(Some(&pki.ca));
    let tls = tls_stream(port, &trusting).await.expect("TLS handshake");
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(format!("wss://localhost:{port}/ws?name=ann"), tls),
    )
    .await
    .expect("upgrade in time")
    .expect("upgrade");
    assert_eq!(next_frame(&mut ws).await["type"], "welcome");
    ws.send(Message::text(r#"{"type":"join","room":"lobby"}"#))
        .await
        .expect("send");
    ws.send(Message::text(
        r#"{"type":"send","room":"lobby","body":"secret","client_id":"c1"}"#,
    ))
    .await
    .expect("send");
    let (mut acked, mut echoed) = (false, false);
    for _ in 0..20 {
        let v = next_frame(&mut ws).await;
        acked |= v["type"] == "ack" && v["client_id"] == "c1";
        echoed |= v["type"] == "message" && v["body"] == "secret";
        if acked && echoed {
            break;
        }
    }
    assert!(acked && echoed, "ack and echo over wss://");

    // The failed handshakes were counted (scraped over https://).
    let mut tls = tls_stream(port, &trusting).await.expect("TLS handshake");
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    tokio::time::timeout(WAIT, tls.read_to_string(&mut body))
        .await
        .expect("metrics in time")
        .ok();
    let counter = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    let tls_errors = counter("chatbus_tls_errors_total");
    assert!(
        tls_errors >= 2,
        "plain and untrusting handshakes counted: {tls_errors}"
    );
    let timeouts = counter("chatbus_handshake_timeouts_total");
    assert!(timeouts >= 1, "the silent socket counted: {timeouts}");

    let _ = server.start_kill();
    let _ = tokio::time::timeout(WAIT, server.wait()).await;
}
