//! A WebSocket ping flood (issue #17), alone in its test binary: the server runs in this
//! process, so the process's memory is the server's only while no other test runs beside it.

mod common;

use std::time::Duration;

use chatbus_ws::WsConfig;
use common::{Server, WAIT};

#[tokio::test]
async fn a_ping_flood_is_closed_with_4008_and_not_answered_in_full() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    const PINGS: usize = 200_000;
    let mut server = Server::start(WsConfig::default()).await;
    let burst = server
        .ws
        .config()
        .control_rate_limit
        .map_or(0, |l| l.burst as usize);
    let c = server.client("flooder").await;
    // The server runs in this process: its memory is this process's.
    let rss = || chatbus_testkit::rss_kib(std::process::id()).unwrap_or(0);
    let rss_before = rss();
    let (mut tx, mut rx) = c.ws.split();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let stop = stop.clone();
        async move {
            for i in 0..PINGS {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return i;
                }
                if tx.feed(Message::Ping(Vec::new().into())).await.is_err() {
                    return i;
                }
                if i % 1000 == 999 && tx.flush().await.is_err() {
                    return i;
                }
            }
            let _ = tx.flush().await;
            PINGS
        }
    });
    let (mut pongs, mut close, mut error) = (0usize, None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while close.is_none() {
        match tokio::time::timeout_at(deadline, rx.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Pong(_)))) => pongs += 1,
            Ok(Some(Ok(Message::Close(c)))) => close = Some(c.map(|c| u16::from(c.code))),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
                if v["type"] == "error" {
                    error = Some(v);
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::time::timeout(WAIT, flood).await;
    assert_eq!(close, Some(Some(4008)), "flood closed with 4008");
    let error = error.expect("an error frame explains the close");
    assert_eq!(error["code"], "rate_limited", "{error}");
    // The server answered at most its budget (tungstenite keeps at most one pong pending):
    // nothing about the flood was queued.
    assert!(pongs <= burst + 1, "{pongs} pongs for a budget of {burst}");
    // And its memory stayed flat: 200,000 unanswered pings queued would be megabytes.
    let rss_after = rss();
    assert!(rss_before > 0, "no VmRSS in /proc/self/status");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB during the flood"
    );
    let m = server.ws.metrics();
    assert_eq!(m.flood_closed, 1);
    assert!(m.errors(chatbus_ws::ErrorCode::RateLimited) >= 1);
    assert!(server.scrape().contains("\nchatbus_flood_closed_total 1\n"));

    // Others are unaffected.
    let mut ann = server.client("ann").await;
    ann.assert_alive().await;
    server.stop().await;
}
