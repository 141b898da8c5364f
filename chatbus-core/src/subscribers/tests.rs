//! Unit tests of the registry: targets, start positions, prepare/activate, the on-vacated
//! callback, pruning and clearing.

use std::sync::mpsc;

use super::*;

fn room(name: &str) -> Room {
    Room::new(name).expect("room name")
}

/// Everything buffered in `sub` now, as payloads (errors as "lagged" / "error").
fn drain(sub: &mut Subscription) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(Some(item)) = futures::FutureExt::now_or_never(sub.recv()) {
        out.push(match item {
            Ok(env) => String::from_utf8_lossy(&env.payload).into_owned(),
            Err(Error::Lagged { .. }) => "lagged".into(),
            Err(_) => "error".into(),
        });
    }
    out
}

#[test]
fn targets_choose_room_and_all_subscribers() {
    let subs = Subscribers::new(8);
    let (a, b) = (room("a"), room("b"));
    let mut in_a = subs.subscribe(Interest::room(a.clone()));
    let mut in_b = subs.subscribe(Interest::room(b.clone()));
    let mut all = subs.subscribe(Interest::All);
    assert_eq!(subs.dispatch(&Envelope::new(a.clone(), "1")), 2);
    let d = subs.dispatch_to(&Envelope::new(a.clone(), "2"), Target::ROOM_SUBSCRIBERS);
    assert_eq!((d.sent, d.dropped), (1, 0));
    let d = subs.dispatch_to(&Envelope::new(b.clone(), "3"), Target::ALL_SUBSCRIBERS);
    assert_eq!((d.sent, d.dropped), (1, 0));
    assert_eq!(drain(&mut in_a), ["1", "2"]);
    assert!(drain(&mut in_b).is_empty());
    assert_eq!(drain(&mut all), ["1", "3"]);
    subs.broadcast_error(|| Error::Lagged { missed: 0 });
    assert_eq!(drain(&mut in_a), ["lagged"]);
    assert_eq!(drain(&mut in_b), ["lagged"]);
    assert_eq!(drain(&mut all), ["lagged"]);
    assert_eq!(subs.len(), 3);
    assert!(subs.has_room(&a) && subs.has_all() && subs.wants(&room("c")));
}

#[test]
fn an_error_for_some_rooms_reaches_only_their_subscribers_and_the_all_ones() {
    let subs = Subscribers::new(8);
    let (a, b) = (room("a"), room("b"));
    let mut in_a = subs.subscribe(Interest::room(a.clone()));
    let mut in_b = subs.subscribe(Interest::room(b.clone()));
    let mut all = subs.subscribe(Interest::All);
    subs.error_where(|r| *r == a, || Error::Lagged { missed: 0 });
    assert_eq!(drain(&mut in_a), ["lagged"]);
    assert!(drain(&mut in_b).is_empty(), "room b is not concerned");
    assert_eq!(drain(&mut all), ["lagged"]);
    // Aimed at a position: subscriptions that start after it are not concerned either.
    let mut late = subs.subscribe_from(Interest::room(a.clone()), vec![Cursor::new(0, 10)]);
    subs.batch().send_error_where(
        Target::ROOM_SUBSCRIBERS.at(Cursor::new(0, 5)),
        |_| true,
        || Error::Lagged { missed: 1 },
    );
    assert!(drain(&mut late).is_empty());
    assert_eq!(drain(&mut in_a), ["lagged"]);
    assert!(
        drain(&mut all).is_empty(),
        "not aimed at Interest::All subscribers"
    );
}

#[test]
fn a_full_buffer_counts_as_dropped() {
    let subs = Subscribers::new(1);
    let r = room("r");
    let _sub = subs.subscribe(Interest::room(r.clone()));
    let first = subs.dispatch_to(&Envelope::new(r.clone(), "1"), Target::EVERYONE);
    let second = subs.dispatch_to(&Envelope::new(r, "2"), Target::EVERYONE);
    assert_eq!((first.sent, first.dropped), (1, 0));
    assert_eq!((second.sent, second.dropped), (0, 1));
}

#[test]
fn start_positions_filter_dispatches_aimed_at_a_position() {
    let subs = Subscribers::new(8);
    let r = room("r");
    let start = vec![Cursor::new(0, 10), Cursor::new(1, 5)];
    let mut late = subs.subscribe_from(Interest::room(r.clone()), start.clone());
    assert_eq!(late.start(), Some(&start[..]));
    let mut plain = subs.subscribe(Interest::room(r.clone()));
    let at = |p, o, text: &str| {
        subs.dispatch_to(
            &Envelope::new(r.clone(), text.to_owned()),
            Target::EVERYONE.at(Cursor::new(p, o)),
        )
        .sent
    };
    assert_eq!(at(0, 9, "p0-9"), 1);
    assert_eq!(at(0, 10, "p0-10"), 2);
    assert_eq!(at(1, 4, "p1-4"), 1);
    assert_eq!(at(1, 5, "p1-5"), 2);
    // A partition the start does not list is never reached.
    assert_eq!(at(2, 100, "p2-100"), 1);
    // Without a position, a dispatch reaches everyone.
    assert_eq!(subs.dispatch(&Envelope::new(r.clone(), "any")), 2);
    assert_eq!(drain(&mut late), ["p0-10", "p1-5", "any"]);
    assert_eq!(drain(&mut plain).len(), 6);

    let mut batch = subs.batch();
    batch.send_error(Target::EVERYONE.at(Cursor::new(0, 3)), || Error::Lagged {
        missed: 1,
    });
    drop(batch);
    assert!(drain(&mut late).is_empty());
    assert_eq!(drain(&mut plain), ["lagged"]);
}

#[test]
fn start_positions_are_found_when_not_indexed_by_partition() {
    let subs = Subscribers::new(8);
    let r = room("r");
    let _sub = subs.subscribe_from(Interest::room(r.clone()), vec![Cursor::new(3, 7)]);
    let at = |o| {
        subs.dispatch_to(
            &Envelope::new(r.clone(), "x"),
            Target::EVERYONE.at(Cursor::new(3, o)),
        )
        .sent
    };
    assert_eq!((at(6), at(7)), (0, 1));
}

#[test]
fn a_pending_subscription_receives_only_once_activated() {
    let subs = Subscribers::new(8);
    let r = room("r");
    let (pending, mut sub) = subs.prepare(Interest::room(r.clone()));
    assert_eq!(pending.interest(), &Interest::room(r.clone()));
    assert_eq!(subs.dispatch(&Envelope::new(r.clone(), "before")), 0);
    assert!(!subs.has_room(&r));
    assert!(pending.activate());
    assert_eq!(subs.dispatch(&Envelope::new(r.clone(), "after")), 1);
    assert_eq!(drain(&mut sub), ["after"]);
    drop(sub);
    assert!(subs.is_empty());
}

#[test]
fn a_pending_subscription_dropped_first_is_never_registered() {
    let subs = Subscribers::new(8);
    let (pending, sub) = subs.prepare(Interest::All);
    drop(sub);
    assert!(pending.is_cancelled());
    assert!(!pending.activate());
    assert!(subs.is_empty());
}

#[test]
fn the_callback_hears_when_the_last_subscriber_of_a_room_leaves() {
    let (tx, rx) = mpsc::channel();
    let subs = Subscribers::with_on_vacated(8, move |v| {
        let _ = tx.send(v);
    });
    let (a, b) = (room("a"), room("b"));
    let both = subs.subscribe(Interest::Rooms(vec![a.clone(), b.clone()]));
    let only_a = subs.subscribe(Interest::room(a.clone()));
    let all = subs.subscribe(Interest::All);
    drop(both);
    let v = rx.try_recv().unwrap();
    assert_eq!((v.rooms, v.all), (vec![b.clone()], false));
    drop(only_a);
    let v = rx.try_recv().unwrap();
    assert_eq!((v.rooms, v.all), (vec![a], false));
    drop(all);
    let v = rx.try_recv().unwrap();
    assert_eq!((v.rooms.len(), v.all), (0, true));
    // A subscription that never got registered still reports its rooms: the broker may
    // have subscribed them upstream for it.
    let (pending, sub) = subs.prepare(Interest::room(b.clone()));
    drop(sub);
    drop(pending);
    let v = rx.try_recv().unwrap();
    assert_eq!(v.rooms, vec![b]);
    assert!(rx.try_recv().is_err());
}

#[test]
fn a_dispatch_that_finds_a_subscriber_gone_removes_it_and_reports() {
    let (tx, rx) = mpsc::channel();
    let subs = Subscribers::with_on_vacated(8, move |v| {
        let _ = tx.send(v);
    });
    let r = room("r");
    // A sender whose subscription is gone but whose guard has not run yet.
    let (sender, sub) = Subscription::channel(1);
    drop(sub);
    let entry = Entry {
        id: 99,
        tx: sender,
        start: None,
    };
    lock(&subs.shared.registry).insert(99, &Interest::room(r.clone()), &entry);
    lock(&subs.shared.registry).insert(99, &Interest::All, &entry);
    assert_eq!(subs.len(), 2);
    let d = subs.dispatch_to(&Envelope::new(r.clone(), "x"), Target::EVERYONE);
    assert_eq!((d.sent, d.dropped), (0, 0));
    assert!(subs.is_empty());
    let v = rx.try_recv().unwrap();
    assert_eq!((v.rooms, v.all), (vec![r], true));
}

#[test]
fn clear_ends_every_subscription() {
    let subs = Subscribers::new(8);
    let mut sub = subs.subscribe(Interest::All);
    subs.clear();
    assert!(subs.is_empty());
    assert!(matches!(
        futures::FutureExt::now_or_never(sub.recv()),
        Some(None)
    ));
}
