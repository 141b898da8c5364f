//! The HTTP upgrade, with tungstenite's request parser and response builder (which check the
//! method, the `Upgrade`/`Connection` headers, the version and the key), on the floor's own
//! socket: after the `101` the connection is the floor's, with whatever the client sent past
//! the request kept for the frame parser.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::{create_response, write_response, Request};

/// A request header larger than this is refused.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that has not finished its request by then is dropped.
const DEADLINE: Duration = Duration::from_secs(10);

/// Why a connection never became a WebSocket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("closed before the request was complete")]
    Eof,
    #[error("request header larger than {MAX_REQUEST} bytes")]
    TooLarge,
    #[error("no request within {DEADLINE:?}")]
    Timeout,
    #[error("not a WebSocket upgrade: {0}")]
    Refused(#[from] tungstenite::Error),
}

/// Reads the upgrade request and answers `101`; returns the bytes read past the request.
pub(crate) async fn accept(stream: &mut TcpStream) -> Result<Vec<u8>, HandshakeError> {
    tokio::time::timeout(DEADLINE, upgrade(stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

async fn upgrade(stream: &mut TcpStream) -> Result<Vec<u8>, HandshakeError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(HandshakeError::Eof);
        }
        match Request::try_parse(&buf)? {
            None if buf.len() > MAX_REQUEST => return Err(HandshakeError::TooLarge),
            None => {}
            Some((used, request)) => {
                let response = create_response(&request)?;
                let mut out = Vec::with_capacity(160);
                write_response(&mut out, &response)?;
                stream.write_all(&out).await?;
                buf.drain(..used);
                return Ok(buf);
            }
        }
    }
}
