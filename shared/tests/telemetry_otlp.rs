//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans reach an OTLP/HTTP collector (`POST /v1/traces`,
//! protobuf) from inside a tokio runtime, and dropping the guard flushes them at exit. The collector
//! is a few lines of HTTP on a local port. (A binary of its own: `init` installs the process-wide
//! subscriber.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use shared::config::{LogFormat, TelemetryArgs};
use shared::telemetry;

/// One request as the collector saw it: request line, lower-cased headers, body.
struct Received {
    request_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Answers every request 200 and hands it over.
fn collector() -> (String, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (sender, received) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.trim().split_once(':') {
                    headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                }
            }
            let length = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .and_then(|(_, value)| value.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            let _ = sender.send(Received { request_line: request_line.trim().to_owned(), headers, body });
        }
    });
    (base, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_and_the_guard_flushes_them_at_exit() {
    let (base, received) = collector();
    let args =
        TelemetryArgs { log_format: LogFormat::Json, log_filter: "off".into(), otlp_endpoint: Some(base) };
    let guard =
        telemetry::init(&args, "monohook-otlp-test").expect("the OTLP exporter is built in a runtime");
    assert!(telemetry::tracing_enabled());

    {
        let span = tracing::info_span!(target: "ingest", "probe_span");
        let _entered = span.enter();
    }
    // What `main` does at exit: the batch still buffered goes out before the guard returns.
    drop(guard);
    assert!(!telemetry::tracing_enabled());

    let request = received.recv_timeout(Duration::from_secs(10)).expect("no export reached the collector");
    assert!(request.request_line.starts_with("POST /v1/traces "), "{}", request.request_line);
    assert!(
        request
            .headers
            .iter()
            .any(|(name, value)| name == "content-type" && value == "application/x-protobuf"),
        "{:?}",
        request.headers
    );
    let body = String::from_utf8_lossy(&request.body);
    assert!(body.contains("probe_span"), "the span is in the export");
    assert!(body.contains("monohook-otlp-test"), "the service is named");
}
