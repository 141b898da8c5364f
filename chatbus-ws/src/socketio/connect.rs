//! Admission of a Socket.IO connection: the checks of the native handshake (shutdown, the
//! connection limit, per-address limits, `Origin`, the token, the connect hook), run as a
//! socketioxide connect middleware on the handshake's `auth` payload.
//!
//! A refusal is a Socket.IO `connect_error` whose message is `"<code>: <reason>"` with the
//! protocol v1 error code; it is counted by code like a refused native handshake.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::ConnectInfo;
use axum::http::header;
use chatbus_core::{Cursor, Room};
use serde::Deserialize;
use serde_json::Value;
use socketioxide::extract::SocketRef;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::inbox::{self, Inbound};

use crate::auth::Identity;
use crate::hooks::{self, ConnData, HookKind};
use crate::ip::{IpSlot, Refusal};
use crate::metrics::WsCounters;
use crate::protocol::ErrorCode;
use crate::server::anonymous;
use crate::service::{ConnSlot, WsService};

/// What a connection proved at the handshake, handed from the middleware to the connect
/// handler through the socket's extensions (which need `Clone`, hence the `Arc`).
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) identity: Identity,
    pub(super) data: ConnData,
    /// Rooms to resume, with the last cursor the client has of each (`auth.cursors`).
    pub(super) cursors: Vec<(Room, Cursor)>,
    /// The socket's events, queued from the moment it was admitted (see [`inbox::open`]).
    pub(super) inbox: Mutex<Option<mpsc::Receiver<Inbound>>>,
    /// Cancelled when socketioxide reports the socket gone.
    pub(super) gone: CancellationToken,
    /// Held for the connection's lifetime: the instance's and the address's counts drop when
    /// the session ends and this is dropped.
    _slots: (ConnSlot, Option<IpSlot>),
}

/// A refused connection: the code (protocol v1) and the reason.
#[derive(Debug)]
pub(super) struct Refused {
    code: ErrorCode,
    message: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

fn refuse(svc: &WsService, code: ErrorCode, message: impl Into<String>) -> Refused {
    let message = message.into();
    svc.counters().count_error(code);
    tracing::debug!(%code, message, "socket.io connection refused");
    Refused { code, message }
}

/// The handshake's `auth` payload. Unknown fields are ignored, as in protocol v1 frames.
#[derive(Debug, Default, Deserialize)]
struct Auth {
    #[serde(default)]
    token: Option<String>,
    /// The display name of an anonymous client (no verifier configured), like `?name=`.
    #[serde(default)]
    name: Option<String>,
    /// `{room: cursor}`: rooms to join at connect, each resumed after its cursor.
    #[serde(default)]
    cursors: BTreeMap<String, String>,
}

/// The connect middleware: admits the socket (storing an [`Admitted`] in its extensions) or
/// refuses it.
pub(super) async fn admit(
    svc: WsService,
    socket: SocketRef,
    auth: Option<Value>,
) -> Result<(), Refused> {
    if svc.is_shutting_down() {
        return Err(refuse(&svc, ErrorCode::Unavailable, "server shutting down"));
    }
    // First: at the limit, refusing must cost next to nothing (as for `/ws`).
    let Some(conn_slot) = svc.reserve_slot() else {
        WsCounters::inc(&svc.counters().connections_refused);
        return Err(refuse(
            &svc,
            ErrorCode::Unavailable,
            "server at its connection limit; retry later or elsewhere",
        ));
    };
    let parts = socket.req_parts();
    let cfg = svc.config();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip_slot = match peer {
        Some(peer) if cfg.ip_limits.enabled() => {
            let ip = cfg.ip_limits.client_ip(peer.ip(), &parts.headers);
            match svc.ips().admit(&cfg.ip_limits, ip) {
                Ok(slot) => Some(slot),
                Err(Refusal::TooManyConnections) => {
                    return Err(refuse(
                        &svc,
                        ErrorCode::RateLimited,
                        "too many connections from your address",
                    ))
                }
                Err(Refusal::TooManyAttempts) => {
                    return Err(refuse(
                        &svc,
                        ErrorCode::RateLimited,
                        "too many connection attempts from your address; retry later",
                    ))
                }
            }
        }
        _ => None,
    };
    let origin = parts
        .headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    if !cfg.allowed_origins.allows(origin, host) {
        return Err(refuse(&svc, ErrorCode::Forbidden, "origin not allowed"));
    }
    let auth: Auth = match auth {
        None | Some(Value::Null) => Auth::default(),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            refuse(
                &svc,
                ErrorCode::BadRequest,
                format!("`auth` must be an object {{token, cursors}}: {e}"),
            )
        })?,
    };
    if auth.cursors.len() > cfg.max_rooms {
        return Err(refuse(
            &svc,
            ErrorCode::Forbidden,
            format!("room limit reached ({} per connection)", cfg.max_rooms),
        ));
    }
    let mut cursors = Vec::with_capacity(auth.cursors.len());
    for (room, cursor) in auth.cursors {
        let room = Room::new(room)
            .map_err(|e| refuse(&svc, ErrorCode::BadRequest, format!("`cursors`: {e}")))?;
        let cursor: Cursor = cursor.parse().map_err(|_| {
            refuse(
                &svc,
                ErrorCode::BadRequest,
                format!("`cursors`: the cursor of `{room}` is not a cursor"),
            )
        })?;
        cursors.push((room, cursor));
    }
    let identity = match &cfg.verifier {
        Some(verifier) => {
            let Some(token) = auth.token.as_deref().filter(|t| !t.is_empty()) else {
                return Err(refuse(&svc, ErrorCode::Unauthorized, "missing token"));
            };
            verifier
                .verify(token)
                .await
                .map_err(|e| refuse(&svc, ErrorCode::Unauthorized, e.message()))?
        }
        None => {
            anonymous(auth.name.as_deref()).map_err(|m| refuse(&svc, ErrorCode::BadRequest, m))?
        }
    };
    let data = match &cfg.hooks {
        None => None,
        Some(h) => {
            let info = hooks::ConnectInfo::new(&identity, &parts.headers, &parts.uri, peer);
            let hook = h.on_connect(&info);
            hooks::call(
                &svc.counters().hooks,
                HookKind::Connect,
                cfg.hook_timeout,
                hook,
            )
            .await
            .map_err(|d| refuse(&svc, ErrorCode::Forbidden, d.reason()))?
        }
    };
    let (inbox, gone) = inbox::open(&svc, &socket);
    socket.extensions.insert(Arc::new(Admitted {
        identity,
        data,
        cursors,
        inbox: Mutex::new(Some(inbox)),
        gone,
        _slots: (conn_slot, ip_slot),
    }));
    Ok(())
}
