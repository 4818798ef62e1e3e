//! Request hardening: oversized headers, slow clients and too many connections are bounded.

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{SECRET, spawn_app, spawn_app_with};

/// Reads what the server sends until it closes the connection or `within` passes.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn address(app: &crate::helpers::TestApp) -> String {
    app.address.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn a_header_block_over_128_kib_is_refused() {
    let app = spawn_app().await;

    let response = app
        .http
        .post(format!("{}/webhooks/mono", app.address))
        .header("mono-webhook-secret", SECRET)
        .header("x-padding", "a".repeat(200 * 1024))
        .body(shared::testing::fixture("account_updated.json"))
        .send()
        .await;

    // actix-http bounds a request head at 128 KiB (and 96 headers): 431, or a dropped connection.
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 431);
    }
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_gets_408() {
    let app = spawn_app_with(|config| config.client_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(address(&app)).await.unwrap();

    stream.write_all(b"POST /webhooks/mono HTTP/1.1\r\nHost: monohook\r\n").await.unwrap();
    let started = Instant::now();
    let answer = read_answer(&mut stream, Duration::from_secs(5)).await;

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_gets_408_and_nothing_is_published() {
    let app = spawn_app_with(|config| config.client_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(address(&app)).await.unwrap();
    let head = format!(
        "POST /webhooks/mono HTTP/1.1\r\nHost: monohook\r\nmono-webhook-secret: {SECRET}\r\ncontent-length: 100\r\n\r\n"
    );

    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(br#"{"event":"#).await.unwrap();
    let started = Instant::now();
    let answer = read_answer(&mut stream, Duration::from_secs(5)).await;

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("request_timeout"), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let app = spawn_app_with(|config| {
        config.max_connections = 2;
        config.http_workers = 1;
    })
    .await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: monohook\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(address(&app)).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buffer = [0u8; 512];
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
        held.push(stream);
    }

    let mut third = TcpStream::connect(address(&app)).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buffer = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buffer)).await;
    assert!(early.is_err(), "a third connection was served while two were open");

    drop(held.pop());
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buffer))
        .await
        .expect("never served")
        .unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
}
