//! WebSocket close codes and close frames (the "Close codes" table of `docs/protocol.md`).

use std::borrow::Cow;
use std::fmt;

/// The close codes this server sends, with the numbers of `docs/protocol.md`.
///
/// Convert with [`u16::from`] (or [`as_u16`](Self::as_u16)) to put one on the wire, and with
/// [`CloseCode::try_from`] to recognise a received code; a code that is not listed here (any
/// other code a client may send) stays a plain `u16` in [`CloseFrame::code`].
///
/// ```
/// use chatbus_ws::CloseCode;
///
/// assert_eq!(u16::from(CloseCode::GoingAway), 1001);
/// assert_eq!(CloseCode::try_from(4001), Ok(CloseCode::IdleTimeout));
/// assert!(CloseCode::try_from(3000).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1000: a normal close; the client closed and the server answers its close.
    Normal,
    /// 1001: the server is shutting down (also sent by browsers navigating away). Reconnect,
    /// to another instance, and resume with `since`.
    GoingAway,
    /// 1007: a text frame was not valid UTF-8.
    InvalidData,
    /// 1009: a frame was larger than [`WsConfig::hard_frame_size`](crate::WsConfig).
    TooLarge,
    /// 4000: the client did not read fast enough (its queue overflowed, or the server closes
    /// slow clients).
    SlowConsumer,
    /// 4001: nothing was received within [`WsConfig::idle_timeout`](crate::WsConfig).
    IdleTimeout,
    /// 4003: the connection's token expired and was not refreshed (a `refresh` frame with a
    /// new token for the same user, before the expiry). Reconnect with a fresh token.
    TokenExpired,
    /// 4008: the client sent control frames (WebSocket pings or pongs) faster than
    /// [`WsConfig::control_rate_limit`](crate::WsConfig) allows.
    ControlFlood,
    /// 4009: the application disconnected this user everywhere
    /// ([`WsService::disconnect_user`](crate::WsService::disconnect_user)). Do not reconnect
    /// automatically.
    Disconnected,
}

impl CloseCode {
    /// Every close code, in numeric order.
    pub const ALL: [Self; 9] = [
        Self::Normal,
        Self::GoingAway,
        Self::InvalidData,
        Self::TooLarge,
        Self::SlowConsumer,
        Self::IdleTimeout,
        Self::TokenExpired,
        Self::ControlFlood,
        Self::Disconnected,
    ];

    /// The number sent in the close frame.
    pub const fn as_u16(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::InvalidData => 1007,
            Self::TooLarge => 1009,
            Self::SlowConsumer => 4000,
            Self::IdleTimeout => 4001,
            Self::TokenExpired => 4003,
            Self::ControlFlood => 4008,
            Self::Disconnected => 4009,
        }
    }

    /// The reason text the server sends with this code.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Normal => "",
            Self::GoingAway => "server shutting down",
            Self::InvalidData => "invalid UTF-8",
            Self::TooLarge => "frame too large",
            Self::SlowConsumer => "slow consumer",
            Self::IdleTimeout => "idle timeout",
            Self::TokenExpired => "token expired",
            Self::ControlFlood => "control frame flood",
            Self::Disconnected => "disconnected by the server",
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.as_u16()
    }
}

/// A close code that is not one of [`CloseCode`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownCloseCode(pub u16);

impl fmt::Display for UnknownCloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "close code {} is not one chatbus sends", self.0)
    }
}

impl std::error::Error for UnknownCloseCode {}

impl TryFrom<u16> for CloseCode {
    type Error = UnknownCloseCode;

    fn try_from(code: u16) -> Result<Self, Self::Error> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_u16() == code)
            .ok_or(UnknownCloseCode(code))
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// A WebSocket close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code: one of [`CloseCode`] when the server sends it; whatever the client
    /// chose when it closes.
    pub code: u16,
    /// A short reason for humans.
    pub reason: Cow<'static, str>,
}

impl CloseFrame {
    /// The frame the server sends with `code` and its documented reason.
    pub fn new(code: CloseCode) -> Self {
        Self {
            code: code.as_u16(),
            reason: Cow::Borrowed(code.reason()),
        }
    }

    /// [`code`](Self::code) as a [`CloseCode`], if it is one.
    pub fn close_code(&self) -> Option<CloseCode> {
        CloseCode::try_from(self.code).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_protocol_table() {
        let numbers: Vec<u16> = CloseCode::ALL.into_iter().map(u16::from).collect();
        assert_eq!(
            numbers,
            [1000, 1001, 1007, 1009, 4000, 4001, 4003, 4008, 4009]
        );
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::try_from(code.as_u16()), Ok(code));
        }
        assert_eq!(CloseCode::try_from(1002), Err(UnknownCloseCode(1002)));
        assert_eq!(
            CloseFrame::new(CloseCode::TooLarge).reason,
            "frame too large"
        );
    }
}
