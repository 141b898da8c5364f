//! Who may use which room: the token's [`RoomGrants`], the reserved internal channels and the
//! direct conversations of two users. One check, [`check`], used by every room request.
//!
//! Names, all within the room charset `[A-Za-z0-9._:-]` (user ids are free text, so they are
//! hashed):
//! - `dm.<h(a)>.<h(b)>`: the direct conversation of users `a` and `b`, the two hashes sorted, so
//!   it is the same whichever of the two sends. A user is a participant when its own hash is one
//!   of the two halves: the check needs no state and no lookup, and a third user cannot forge a
//!   name that lets it in without a collision of the hash (SHA-256, cut to 128 bits).
//! - `_u:<h(user)>`: a user's personal channel. Every connection of the user is subscribed to it
//!   (on its instance), so a user is reachable on every instance without joining anything.
//! - `_s:<h(user)>`: a user's status channel, subscribed to by the connections that watch it.
//!
//! Clients cannot join, read or post to names starting with `_`.

use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;

use chatbus_core::Room;
use sha2::{Digest, Sha256};

use crate::auth::Identity;

/// The prefix of direct conversations.
pub(crate) const DIRECT_PREFIX: &str = "dm.";
/// The prefix of internal channels (personal and status channels), never open to clients.
pub(crate) const INTERNAL_PREFIX: &str = "_";

/// The longest list of room patterns a token may carry (a token is at most a few KiB anyway;
/// the bound keeps every check cheap).
pub const MAX_ROOM_GRANTS: usize = 256;

/// The rooms a connection may use, from its token's `rooms` claim: exact names, or prefixes
/// written with a trailing `*` (`"team-a-*"` matches `team-a-general` and `team-a-`).
///
/// Without grants ([`Identity::rooms`] `None`) a user may use every public room. Direct
/// conversations of the user are allowed either way.
///
/// ```
/// use chatbus_core::Room;
/// use chatbus_ws::RoomGrants;
///
/// let grants = RoomGrants::new(["lobby", "team-a-*"])?;
/// assert!(grants.allows(&Room::new("lobby")?));
/// assert!(grants.allows(&Room::new("team-a-general")?));
/// assert!(!grants.allows(&Room::new("team-b-general")?));
/// assert!(!grants.allows(&Room::new("lobby2")?));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RoomGrants(Arc<[Grant]>);

#[derive(Clone, PartialEq, Eq)]
enum Grant {
    Exact(Box<str>),
    Prefix(Box<str>),
}

/// Why a list of room patterns was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidGrant(String);

impl fmt::Display for InvalidGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidGrant {}

impl RoomGrants {
    /// Grants from patterns: each a valid room name, optionally ending in `*` (a prefix; `*`
    /// alone matches every public room). At most [`MAX_ROOM_GRANTS`].
    pub fn new<I, S>(patterns: I) -> Result<Self, InvalidGrant>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut grants = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            if grants.len() == MAX_ROOM_GRANTS {
                return Err(InvalidGrant(format!(
                    "more than {MAX_ROOM_GRANTS} room patterns"
                )));
            }
            let grant = match p.strip_suffix('*') {
                Some("") => Grant::Prefix("".into()),
                Some(prefix) => {
                    Room::validate(prefix)
                        .map_err(|e| InvalidGrant(format!("room pattern {p:?}: {e}")))?;
                    Grant::Prefix(prefix.into())
                }
                None => {
                    Room::validate(p)
                        .map_err(|e| InvalidGrant(format!("room pattern {p:?}: {e}")))?;
                    Grant::Exact(p.into())
                }
            };
            grants.push(grant);
        }
        Ok(Self(grants.into()))
    }

    /// Whether `room` matches one of the patterns.
    pub fn allows(&self, room: &Room) -> bool {
        let name = room.as_str();
        self.0.iter().any(|g| match g {
            Grant::Exact(n) => **n == *name,
            Grant::Prefix(p) => name.starts_with(&**p),
        })
    }
}

impl fmt::Debug for RoomGrants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|g| match g {
                Grant::Exact(n) => n.to_string(),
                Grant::Prefix(p) => format!("{p}*"),
            }))
            .finish()
    }
}

/// 128 bits of SHA-256 of a user id, in hex (32 characters).
fn user_hash(user: &str) -> String {
    let digest = Sha256::digest(user.as_bytes());
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn internal(kind: &str, user: &str) -> Room {
    let name = format!("{INTERNAL_PREFIX}{kind}:{}", user_hash(user));
    // 35 characters of the room charset: always valid.
    Room::new(&name).unwrap_or_else(|_| unreachable!("{name} is a valid room name"))
}

/// The direct conversation of users `a` and `b`: the same room whichever of the two is first.
///
/// ```
/// let ab = chatbus_ws::direct_room("ann", "bob");
/// assert_eq!(ab, chatbus_ws::direct_room("bob", "ann"));
/// assert!(ab.as_str().starts_with("dm."));
/// assert_ne!(ab, chatbus_ws::direct_room("ann", "carol"));
/// ```
pub fn direct_room(a: &str, b: &str) -> Room {
    let (mut x, mut y) = (user_hash(a), user_hash(b));
    if x > y {
        std::mem::swap(&mut x, &mut y);
    }
    let name = format!("{DIRECT_PREFIX}{x}.{y}");
    Room::new(&name).unwrap_or_else(|_| unreachable!("{name} is a valid room name"))
}

/// Whether `user` is one of the two participants of the direct conversation `room`.
pub(crate) fn is_participant(room: &Room, user: &str) -> bool {
    let Some(rest) = room.as_str().strip_prefix(DIRECT_PREFIX) else {
        return false;
    };
    let me = user_hash(user);
    rest.split('.').any(|h| h == me) && rest.split('.').count() == 2
}

/// The personal channel of `user` (direct message copies, status probes, disconnects).
pub(crate) fn user_channel(user: &str) -> Room {
    internal("u", user)
}

/// The status channel of `user` (its instances' online/offline snapshots).
pub(crate) fn status_channel(user: &str) -> Room {
    internal("s", user)
}

/// Whether `room` is a status channel (one per watched user).
pub(crate) fn is_status_channel(room: &Room) -> bool {
    room.as_str().starts_with("_s:")
}

/// Whether `room` is an internal channel (not listed, never presence-tracked).
pub(crate) fn is_internal(room: &Room) -> bool {
    room.as_str().starts_with(INTERNAL_PREFIX)
}

/// Whether `room` counts towards the rooms a connection joined ([`WsConfig::max_rooms`](crate::WsConfig)).
pub(crate) fn is_client_room(room: &Room) -> bool {
    !is_internal(room)
}

/// Whether `identity` may join, read, post or type in `room`; the reason shown to the client
/// (with code `forbidden`) if not.
pub(crate) fn check(identity: &Identity, room: &Room) -> Result<(), &'static str> {
    if is_internal(room) {
        return Err("room names starting with '_' are reserved");
    }
    if room.as_str().starts_with(DIRECT_PREFIX) {
        return if is_participant(room, &identity.user) {
            Ok(())
        } else {
            Err("a direct conversation of other users")
        };
    }
    match &identity.rooms {
        Some(grants) if !grants.allows(room) => Err("the token does not grant this room"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> Room {
        Room::new(name).expect("valid")
    }

    #[test]
    fn grants_match_exact_names_and_prefixes() {
        let g = RoomGrants::new(["lobby", "team-a-*"]).expect("valid");
        assert!(g.allows(&room("lobby")));
        assert!(g.allows(&room("team-a-")));
        assert!(g.allows(&room("team-a-x")));
        assert!(!g.allows(&room("team-b")));
        assert!(!g.allows(&room("lobbyx")));
        assert!(RoomGrants::new(["*"]).expect("valid").allows(&room("any")));
        assert!(!RoomGrants::new(Vec::<String>::new())
            .expect("valid")
            .allows(&room("lobby")));
        assert!(RoomGrants::new(["bad room"]).is_err());
        assert!(RoomGrants::new(["a*b*"]).is_err());
        assert!(RoomGrants::new(vec!["a"; MAX_ROOM_GRANTS + 1]).is_err());
    }

    #[test]
    fn direct_rooms_admit_their_two_participants_only() {
        let r = direct_room("ann", "bob");
        assert_eq!(r, direct_room("bob", "ann"));
        assert!(is_participant(&r, "ann") && is_participant(&r, "bob"));
        assert!(!is_participant(&r, "carol"));
        let me = direct_room("ann", "ann");
        assert!(is_participant(&me, "ann") && !is_participant(&me, "bob"));
        // Names that only look like conversations admit nobody by accident.
        let h = user_hash("ann");
        assert!(!is_participant(&room(&format!("dm.{h}")), "ann"));
        assert!(!is_participant(&room(&format!("dm.{h}.x.y")), "ann"));
        assert!(is_participant(&room(&format!("dm.{h}.x")), "ann"));
    }

    #[test]
    fn the_check_guards_internal_direct_and_granted_rooms() {
        let ann = Identity::new("ann").expect("valid");
        let limited = ann
            .clone()
            .with_rooms(Some(RoomGrants::new(["lobby"]).expect("valid")));
        assert!(check(&ann, &room("anything")).is_ok());
        assert!(check(&limited, &room("lobby")).is_ok());
        assert!(check(&limited, &room("other")).is_err());
        assert!(check(&ann, &user_channel("ann")).is_err());
        assert!(check(&ann, &status_channel("bob")).is_err());
        let dm = direct_room("ann", "bob");
        assert!(
            check(&limited, &dm).is_ok(),
            "own conversations need no grant"
        );
        let carol = Identity::new("carol").expect("valid");
        assert!(check(&carol, &dm).is_err());
    }
}
