use bytes::Bytes;

use super::*;

fn code(text: &str) -> (ErrorCode, String) {
    match parse(text.as_bytes()) {
        Ok(r) => panic!("{text} parsed as {r:?}"),
        Err(e) => (e.code, e.message),
    }
}

/// The fuzz target's property on a few accepted and rejected frames (the fuzzer's findings,
/// once fixed, are added here).
#[test]
fn fuzz_property() {
    for ok in [
        &br#"{"type":"join","room":"general","since":"0-41","client_id":1}"#[..],
        br#"{"type":"watch","users":["bob","carol","bob"],"client_id":-0.0}"#,
        br#"{"type":"send","to":"bob","body":"psst","client_id":"c"}"#,
        br#"{"type":"history","room":"r","before":"2-100","limit":5}"#,
    ] {
        assert!(fuzz_check(ok), "{}", String::from_utf8_lossy(ok));
    }
    for bad in [
        &b""[..],
        b"[]",
        br#"{"type":"join","room":"","client_id":1e3}"#,
        br#"{"type":"join","room":"r","since":"+1-2"}"#,
    ] {
        assert!(!fuzz_check(bad), "{}", String::from_utf8_lossy(bad));
    }
}

/// Found by the `client_frame` fuzz target: serde_json's default float parser is not
/// correctly rounded, so a long decimal `client_id` came back as a neighbouring double, one
/// the client's own JSON parser reads as another number than the one it sent.
#[test]
fn float_client_id_echoes_as_sent() {
    let text = "3.666666663333333333333333332";
    let frame = format!(r#"{{"type":"ping","client_id":{text}}}"#);
    let (_, cid) = parse(frame.as_bytes()).expect("ping");
    let reply: serde_json::Value =
        serde_json::from_slice(&error(ErrorCode::BadRequest, "x", cid.as_ref(), None))
            .expect("JSON");
    let sent: f64 = text.parse().expect("a float");
    assert_eq!(reply["client_id"].as_f64(), Some(sent));
    assert!(fuzz_check(frame.as_bytes()));
}

#[test]
fn parses_refresh() {
    let (r, cid) = parse(br#"{"type":"refresh","token":"t.k.n","client_id":1}"#).expect("refresh");
    assert!(matches!(r, Request::Refresh { token } if token == "t.k.n"));
    assert!(cid.is_some());
    assert_eq!(code(r#"{"type":"refresh"}"#).1, "missing field `token`");
    assert_eq!(
        code(r#"{"type":"refresh","token":""}"#).1,
        "missing field `token`"
    );
    let frame: serde_json::Value = serde_json::from_slice(&refreshed(Some(5), None)).expect("JSON");
    assert_eq!(
        frame,
        serde_json::json!({"type": "refreshed", "expires": 5})
    );
}

#[test]
fn parses_every_request() {
    let (r, cid) = parse(br#"{"type":"join","room":"a","since":"0-5"}"#).expect("join");
    assert!(matches!(r, Request::Join { since: Some(c), .. } if c == Cursor::new(0, 5)));
    assert!(cid.is_none());
    let (r, cid) =
        parse(br#"{"type":"send","room":"a","body":"h\u00e9","client_id":"c1"}"#).expect("s");
    assert!(matches!(r, Request::Send { ref body, .. } if body == "hé"));
    assert_eq!(cid, Some(ClientId::Str("c1".into())));
    let (_, cid) = parse(br#"{"type":"send","room":"a","body":"x","client_id":7}"#).expect("n");
    assert!(matches!(cid, Some(ClientId::Num(_))));
    assert!(matches!(
        parse(br#"{"type":"history","room":"a","limit":5,"before":null}"#),
        Ok((
            Request::History {
                limit: Some(5),
                before: None,
                ..
            },
            _
        ))
    ));
    assert!(matches!(
        parse(br#"{"type":"ping","extra":1}"#),
        Ok((Request::Ping, _))
    ));
    let (r, _) = parse(br#"{"type":"send","to":"bob","body":"psst"}"#).expect("direct");
    assert!(
        matches!(r, Request::Direct { ref to, ref body, .. } if &**to == "bob" && body == "psst")
    );
    let (r, _) = parse(br#"{"type":"watch","users":["a","b","a"]}"#).expect("watch");
    assert!(matches!(r, Request::Watch { ref users } if users.len() == 2));
    let (r, _) = parse(br#"{"type":"unwatch","users":[]}"#).expect("unwatch");
    assert!(matches!(r, Request::Unwatch { ref users } if users.is_empty()));
}

#[test]
fn rejects_bad_direct_and_watch_frames() {
    assert!(code(r#"{"type":"send","room":"a","to":"b","body":"x"}"#)
        .1
        .contains("not both"));
    assert!(code(r#"{"type":"send","to":"","body":"x"}"#)
        .1
        .starts_with("`to`"));
    assert_eq!(code(r#"{"type":"watch"}"#).1, "missing field `users`");
    assert!(code(r#"{"type":"watch","users":["a\nb"]}"#)
        .1
        .starts_with("`users`"));
    let many = format!(
        r#"{{"type":"watch","users":[{}]}}"#,
        vec![r#""u""#; 1001].join(",")
    );
    assert!(code(&many).1.contains("more than 1000"));
}

#[test]
fn rejects_bad_input_with_a_reason() {
    assert!(code("{nope").1.starts_with("malformed frame"));
    assert_eq!(code(r#"{"type":"dance"}"#).1, r#"unknown type "dance""#);
    assert_eq!(code(r#"{"room":"a"}"#).1, "missing field `type`");
    assert_eq!(
        code(r#"{"type":"send","room":"a"}"#).1,
        "missing field `body`"
    );
    assert_eq!(code(r#"{"type":"join"}"#).1, "missing field `room`");
    assert!(code(r#"{"type":"join","room":"no spaces"}"#)
        .1
        .contains("invalid room"));
    assert!(code(r#"{"type":"join","room":"a","since":"x"}"#)
        .1
        .contains("cursor"));
    assert!(code(r#"{"type":"join","room":5}"#)
        .1
        .starts_with("malformed"));
    assert!(code(r#"[1,2]"#).1.starts_with("malformed"));
    let long = format!(r#"{{"type":"ping","client_id":"{}"}}"#, "x".repeat(65));
    assert!(code(&long).1.contains("client_id"));
    // The client id is kept for the error reply when the frame itself parsed.
    let e = parse(br#"{"type":"send","room":"a","client_id":"k"}"#).expect_err("no body");
    assert_eq!(e.client_id, Some(ClientId::Str("k".into())));
}

#[test]
fn frames_are_valid_json() {
    let room = Room::new("r").expect("room");
    let m = [
        Bytes::from_static(br#"{"a":1}"#),
        Bytes::from_static(br#"{"b":2}"#),
    ];
    let cid = ClientId::Str("q".into());
    let h: serde_json::Value =
        serde_json::from_slice(&history(&room, &m, None, Some(&cid))).expect("json");
    assert_eq!(h["messages"][1]["b"], 2);
    assert_eq!(h["client_id"], "q");
    assert!(h.get("complete").is_none() && h.get("before").is_none());
    let partial: serde_json::Value =
        serde_json::from_slice(&history(&room, &m, Some("0-17"), None)).expect("json");
    assert_eq!(
        (&partial["complete"], &partial["before"]),
        (&false.into(), &"0-17".into())
    );
    let e: serde_json::Value =
        serde_json::from_slice(&error(ErrorCode::NotJoined, "x", None, Some(&room))).expect("json");
    assert_eq!(e["code"], "not_joined");
    assert_eq!(e["room"], "r");
    let p: serde_json::Value =
        serde_json::from_slice(&presence(&room, &["b", "a"], 100)).expect("json");
    assert_eq!(p["online"][0], "b");
    assert_eq!(p["count"], 2);
    assert!(p.get("paged").is_none());
    // A big room says how many there are, and that the names are paged (`members`).
    let p: serde_json::Value =
        serde_json::from_slice(&presence(&room, &["a", "b", "c"], 2)).expect("json");
    assert_eq!(p["online"], serde_json::json!([]));
    assert_eq!(p["count"], 3);
    assert_eq!(p["paged"], true);
    let m: serde_json::Value = serde_json::from_slice(&members(
        &room,
        &[Arc::from("a"), Arc::from("b")],
        Some("b"),
        Some(&ClientId::Num(7.into())),
    ))
    .expect("json");
    assert_eq!(
        m,
        serde_json::json!({"type":"members","room":"r","users":["a","b"],"next":"b","client_id":7})
    );
}
