//! The announcement state machine, fed by hand: full lists, diffs, a missed diff, expiry.

use std::sync::Arc;
use std::time::Duration;

use chatbus_core::Room;

use super::*;
use crate::payload::{Diff, Snapshot};

fn names(v: &[&str]) -> Vec<Arc<str>> {
    v.iter().map(|s| Arc::from(*s)).collect()
}

fn full(instance: u128, seq: u64, users: &[&str]) -> Snapshot {
    Snapshot {
        instance,
        seq,
        hello: false,
        users: names(users),
    }
}

fn diff(instance: u128, seq: u64, base: u64, added: &[&str], removed: &[&str]) -> Diff {
    Diff {
        instance,
        seq,
        base,
        added: names(added),
        removed: names(removed),
    }
}

/// The `online` list and `count` of a presence frame.
fn listed(frame: &Bytes) -> (Vec<String>, u64) {
    let v: serde_json::Value = serde_json::from_slice(frame).unwrap();
    let online = v["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    (online, v["count"].as_u64().unwrap())
}

fn presence() -> Presence {
    Presence::new(PresenceConfig::default().with_max_listed(2))
}

#[test]
fn diffs_apply_on_top_of_the_full_list_they_follow() {
    let p = presence();
    let room = Room::new("r").unwrap();
    let f = p.on_snapshot(&room, full(7, 1, &["a", "b"])).unwrap();
    assert_eq!(listed(&f), (vec!["a".into(), "b".into()], 2));
    // Another instance lists "b" too: the union does not change, no frame.
    assert!(p.on_snapshot(&room, full(8, 1, &["b"])).is_none());
    let f = p.on_diff(&room, diff(7, 2, 1, &["c"], &["a"])).unwrap();
    assert_eq!(listed(&f), (vec!["b".into(), "c".into()], 2));
    // A third name (max_listed 2): the count only; then back to two, listed again.
    let f = p.on_diff(&room, diff(8, 2, 1, &["d"], &[])).unwrap();
    assert_eq!(listed(&f), (Vec::<String>::new(), 3));
    let f = p.on_diff(&room, diff(8, 3, 2, &[], &["d"])).unwrap();
    assert_eq!(listed(&f), (vec!["b".into(), "c".into()], 2));
    // Instance 8 leaves "b", but 7 still lists it: no change.
    assert!(p.on_diff(&room, diff(8, 4, 3, &[], &["b"])).is_none());
    let f = p.on_diff(&room, diff(7, 3, 2, &[], &["b"])).unwrap();
    assert_eq!(listed(&f), (vec!["c".into()], 1));
    // A heartbeat (empty diff) changes nothing and sends nothing.
    assert!(p.on_diff(&room, diff(7, 4, 3, &[], &[])).is_none());
    // A late copy of an older diff is ignored.
    assert!(p.on_diff(&room, diff(7, 3, 2, &["zz"], &[])).is_none());
    assert_eq!(p.current(&room, Vec::new()), names(&["c"]));
    assert_eq!(listed(&p.last_frame(&room).unwrap()), (vec!["c".into()], 1));
}

#[test]
fn a_missed_diff_asks_for_full_lists_once_and_a_full_list_repairs_it() {
    let p = presence();
    let room = Room::new("r").unwrap();
    p.on_snapshot(&room, full(7, 1, &["a"])).unwrap();
    // seq 2 was lost: the diff from 2 to 3 does not apply, the view keeps what it has...
    assert!(p.on_diff(&room, diff(7, 3, 2, &["b"], &[])).is_none());
    assert_eq!(p.current(&room, Vec::new()), names(&["a"]));
    {
        let ob = lock(&p.outbox);
        assert!(ob.hello.contains(&room), "a hello is due");
        assert!(ob.full.contains(&room) && ob.dirty.contains(&room));
    }
    lock(&p.outbox).hello.clear();
    // ...and asks only once per interval, however many diffs miss.
    assert!(p.on_diff(&room, diff(7, 4, 3, &["c"], &[])).is_none());
    assert!(!lock(&p.outbox).hello.contains(&room));
    // The full list the hello brings repairs it.
    let f = p.on_snapshot(&room, full(7, 5, &["a", "b", "c"])).unwrap();
    // Three online, max_listed 2: the count only.
    assert_eq!(listed(&f), (Vec::<String>::new(), 3));
    // And diffs apply again.
    let f = p.on_diff(&room, diff(7, 6, 5, &[], &["a"])).unwrap();
    assert_eq!(listed(&f), (vec!["b".into(), "c".into()], 2));
}

#[test]
fn a_diff_from_an_instance_never_heard_in_full_asks_for_full_lists() {
    let p = presence();
    let room = Room::new("r").unwrap();
    assert!(p.on_diff(&room, diff(9, 5, 4, &["x"], &[])).is_none());
    assert!(lock(&p.outbox).hello.contains(&room));
    assert!(p.current(&room, Vec::new()).is_empty());
}

#[test]
fn a_hello_from_another_instance_makes_the_next_announcement_full() {
    let p = presence();
    let room = Room::new("r").unwrap();
    let mut hello = full(7, 1, &["a"]);
    hello.hello = true;
    p.on_snapshot(&room, hello);
    let ob = lock(&p.outbox);
    assert!(ob.full.contains(&room) && ob.dirty.contains(&room));
    // Answering is a full list, not a hello of its own.
    assert!(!ob.hello.contains(&room));
}

#[tokio::test(start_paused = true)]
async fn instances_not_heard_from_for_three_intervals_are_forgotten() {
    let p = Presence::new(PresenceConfig::default().with_interval(Duration::from_secs(1)));
    let room = Room::new("r").unwrap();
    p.on_snapshot(&room, full(7, 1, &["a"])).unwrap();
    p.on_snapshot(&room, full(8, 1, &["b"])).unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    // 8 stays alive with heartbeats; 7 says nothing.
    assert!(p.on_diff(&room, diff(8, 2, 1, &[], &[])).is_none());
    tokio::time::advance(Duration::from_millis(1500)).await;
    let f = p.on_diff(&room, diff(8, 3, 2, &[], &[])).unwrap();
    assert_eq!(listed(&f), (vec!["b".into()], 1));
}

#[test]
fn members_pages_through_every_instance_and_the_local_connections_in_order() {
    let p = presence();
    let room = Room::new("r").unwrap();
    p.on_snapshot(&room, full(7, 1, &["a", "c", "e"]));
    p.on_snapshot(&room, full(8, 1, &["b", "c"]));
    // "d" is connected here and not announced yet; "a" is both.
    let local = names(&["d", "a"]);
    assert_eq!(
        p.page(&room, local.clone(), None, 2),
        (names(&["a", "b"]), true)
    );
    assert_eq!(
        p.page(&room, local.clone(), Some("b"), 2),
        (names(&["c", "d"]), true)
    );
    assert_eq!(
        p.page(&room, local.clone(), Some("d"), 2),
        (names(&["e"]), false)
    );
    assert_eq!(
        p.page(&room, local.clone(), Some("e"), 2),
        (Vec::new(), false)
    );
    assert_eq!(
        p.page(&room, local, None, 10),
        (names(&["a", "b", "c", "d", "e"]), false)
    );
    let other = Room::new("other").unwrap();
    assert_eq!(
        p.page(&other, names(&["z"]), None, 10),
        (names(&["z"]), false)
    );
}

#[test]
fn changes_between_sorted_lists() {
    let (added, removed) = changes(&names(&["a", "c", "d"]), &names(&["b", "c", "e"]));
    assert_eq!(added, names(&["b", "e"]));
    assert_eq!(removed, names(&["a", "d"]));
    let (added, removed) = changes(&[], &names(&["a"]));
    assert_eq!((added, removed), (names(&["a"]), Vec::new()));
    let (added, removed) = changes(&names(&["a"]), &[]);
    assert_eq!((added, removed), (Vec::new(), names(&["a"])));
}
