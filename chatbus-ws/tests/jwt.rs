//! JWT auth at the handshake: HS256 and RS256, over a real WebSocket.
#![cfg(feature = "jwt")]

mod common;

use chatbus_ws::{ErrorCode, JwtVerifier, WsConfig};
use common::{Client, Server};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &[u8] = b"test-secret-that-is-long-enough-for-hs256";
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rs256_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/rs256_public.pem");

fn now() -> i64 {
    i64::try_from(chatbus_core::backend::now_ms() / 1000).expect("time")
}

fn hs(claims: serde_json::Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("encode")
}

fn rs(claims: serde_json::Value) -> String {
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("test key");
    encode(&Header::new(Algorithm::RS256), &claims, &key).expect("encode")
}

async fn refused(server: &Server, query: &str) -> (u16, String) {
    Client::try_connect(server.url(query))
        .await
        .err()
        .unwrap_or_else(|| panic!("{query} was accepted"))
}

#[tokio::test]
async fn hs256_tokens() {
    let config = WsConfig::default().with_verifier(JwtVerifier::hs256(SECRET));
    let mut server = Server::start(config).await;

    let good = hs(json!({"sub":"u42","name":"Ann","exp":now()+600}), SECRET);
    let mut c = Client::connect(&server.url(&format!("?token={good}"))).await;
    assert_eq!(c.welcome["user"], "u42");
    assert_eq!(c.welcome["name"], "Ann");
    c.join("j").await;
    let (_, echo) = c.say("j", "signed", "1").await;
    assert_eq!(echo["from"], "u42");
    assert_eq!(echo["name"], "Ann");

    // ?name= cannot override the token's identity.
    let c2 = Client::connect(&server.url(&format!("?token={good}&name=root"))).await;
    assert_eq!(c2.welcome["user"], "u42");

    let expired = hs(json!({"sub":"u42","exp":now()-3600}), SECRET);
    let (status, body) = refused(&server, &format!("?token={expired}")).await;
    assert_eq!(status, 401);
    assert!(
        body.contains("unauthorized") && body.contains("expired"),
        "{body}"
    );

    let forged = hs(
        json!({"sub":"admin","exp":now()+600}),
        b"another-secret-entirely-different",
    );
    let (status, body) = refused(&server, &format!("?token={forged}")).await;
    assert_eq!(status, 401);
    assert!(body.contains("signature"), "{body}");

    let (status, _) = refused(&server, "?name=anonymous").await;
    assert_eq!(status, 401, "no token");
    let (status, _) = refused(&server, "?token=not.a.jwt").await;
    assert_eq!(status, 401);
    let no_sub = hs(json!({"exp":now()+600}), SECRET);
    assert_eq!(refused(&server, &format!("?token={no_sub}")).await.0, 401);
    // An RS256 token is not accepted by an HS256 verifier.
    let other_alg = rs(json!({"sub":"u1","exp":now()+600}));
    assert_eq!(
        refused(&server, &format!("?token={other_alg}")).await.0,
        401
    );

    assert_eq!(server.ws.metrics().errors(ErrorCode::Unauthorized), 6);
    // Refusals leave the server serving.
    let mut again = Client::connect(&server.url(&format!("?token={good}"))).await;
    again.assert_alive().await;
    server.stop().await;
}

#[tokio::test]
async fn rs256_tokens_in_the_authorization_header() {
    let verifier = JwtVerifier::rs256_pem(RSA_PUBLIC).expect("public key");
    let mut server = Server::start(WsConfig::default().with_verifier(verifier)).await;

    let token = rs(json!({"sub":"carol","exp":now()+600}));
    let mut req = server.url("").into_client_request().expect("request");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let mut c = Client::try_connect(req).await.expect("accepted");
    assert_eq!(c.welcome["user"], "carol");
    c.assert_alive().await;

    let expired = rs(json!({"sub":"carol","exp":now()-3600}));
    assert_eq!(refused(&server, &format!("?token={expired}")).await.0, 401);
    // Signed with HS256 using the public key as the secret: the classic algorithm confusion.
    let confused = hs(json!({"sub":"carol","exp":now()+600}), RSA_PUBLIC);
    assert_eq!(refused(&server, &format!("?token={confused}")).await.0, 401);
    // A tampered payload breaks the signature.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let forged = hs(json!({"sub":"admin","exp":now()+600}), b"x");
    parts[1] = forged.split('.').nth(1).expect("payload").to_owned();
    assert_eq!(
        refused(&server, &format!("?token={}", parts.join(".")))
            .await
            .0,
        401
    );
    server.stop().await;
}

#[test]
fn bad_rsa_key_is_a_clear_error() {
    let e = JwtVerifier::rs256_pem(b"not a key").expect_err("refused");
    assert!(e.message().contains("RSA public key"), "{e}");
}
