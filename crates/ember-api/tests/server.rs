//! The server over a real Unix socket, with a raw HTTP client (what `curl --unix-socket`
//! sends): answers, keep-alive, chunked bodies, limits, hostile clients.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use ember_api::{ApiRequest, ApiResponse, ApiServer, ServerConfig};

fn server(config: ServerConfig) -> (vmm_sys_util::tempdir::TempDir, PathBuf) {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
    let path = dir.as_path().join("api.sock");
    let s = ApiServer::bind(&path).unwrap();
    // Each call is answered on a thread of its own, as a VMM answers from its own thread.
    s.spawn(config, |call| {
        std::thread::spawn(move || answer(call));
    })
    .unwrap();
    (dir, path)
}

fn answer(call: ember_api::ApiCall) {
    {
        let r = match &call.request {
            ApiRequest::GetVersion => ApiResponse::ok(&ember_api::model::FirecrackerVersion {
                firecracker_version: "1.16.1".into(),
            }),
            ApiRequest::PutBootSource(b) if b.kernel_image_path == "/slow" => {
                std::thread::sleep(Duration::from_millis(300));
                ApiResponse::no_content()
            }
            _ => ApiResponse::no_content(),
        };
        call.reply(r);
    }
}

/// Sends `raw` and reads until `responses` responses arrived (by counting status lines) or
/// the server closed.
fn exchange(path: &PathBuf, raw: &[u8], responses: usize) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&out).matches("HTTP/1.1 ").count() < responses {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    // Give a trailing body time to arrive.
    std::thread::sleep(Duration::from_millis(50));
    s.set_nonblocking(true).unwrap();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn answers_and_keeps_the_connection_alive() {
    let (_d, path) = server(ServerConfig::default());
    let out = exchange(
        &path,
        b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n\
          PUT /boot-source HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"kernel_image_path\":\"/k\"}\n",
        2,
    );
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(
        out.contains("{\"firecracker_version\":\"1.16.1\"}"),
        "{out}"
    );
    assert!(out.contains("HTTP/1.1 204 No Content"), "{out}");
}

#[test]
fn chunked_bodies_are_read() {
    let (_d, path) = server(ServerConfig::default());
    let out = exchange(
        &path,
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          10\r\n{\"kernel_image_p\r\na\r\nath\":\"/k\"}\r\n0\r\n\r\n",
        1,
    );
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
}

#[test]
fn bad_requests_get_firecrackers_400s() {
    let (_d, path) = server(ServerConfig::default());
    let out = exchange(&path, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 1);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.contains("Invalid request method and/or path: GET /nowhere."),
        "{out}"
    );
    let out = exchange(
        &path,
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{\"a\": 1}\n",
        1,
    );
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("unknown field"), "{out}");
}

#[test]
fn oversized_bodies_are_refused_declared_or_chunked() {
    let (_d, path) = server(ServerConfig {
        max_payload: 100,
        ..ServerConfig::default()
    });
    let out = exchange(
        &path,
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n",
        1,
    );
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("larger than the limit of 100"), "{out}");
    let mut chunked =
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(b"20\r\n");
        chunked.extend_from_slice(&[b'x'; 0x20]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let out = exchange(&path, &chunked, 1);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("larger than the limit of 100"), "{out}");
}

#[test]
fn garbage_and_slow_clients_do_not_stop_the_server() {
    let (_d, path) = server(ServerConfig {
        header_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    // Not HTTP at all.
    let out = exchange(&path, b"\x00\x01\x02 hello\r\n\r\n", 1);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out:?}");
    // A client that never finishes its headers is dropped after the timeout.
    let mut slow = UnixStream::connect(&path).unwrap();
    slow.write_all(b"GET /version HTTP/1.1\r\nHost").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    let t = std::time::Instant::now();
    let n = slow.read(&mut buf).unwrap_or(0);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "slow client kept for {:?}",
        t.elapsed()
    );
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    // Too many headers.
    let mut many = b"GET /version HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let out = exchange(&path, &many, 1);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out:?}");
    // And the server still answers.
    let out = exchange(&path, b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n", 1);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[test]
fn a_slow_vmm_answer_does_not_block_other_connections() {
    let (_d, path) = server(ServerConfig::default());
    let p2 = path.clone();
    let slow = std::thread::spawn(move || {
        exchange(
            &p2,
            b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n{\"kernel_image_path\":\"/slow\"}\n",
            1,
        )
    });
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    let out = exchange(&path, b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n", 1);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert!(slow.join().unwrap().starts_with("HTTP/1.1 204"));
}

#[test]
fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let (_d, path) = server(ServerConfig::default());
    assert!(matches!(
        ApiServer::bind(&path),
        Err(ember_api::ServerError::InUse(_))
    ));
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
    let stale = dir.as_path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(ApiServer::bind(&stale).is_ok());
    let file = dir.as_path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        ApiServer::bind(&file),
        Err(ember_api::ServerError::NotASocket(_))
    ));
}

/// `DrainHandle::wait` holds the process's exit while the server still has an answer to
/// write: not drained while the VMM has not answered, drained once it has, and by then the
/// answer is in the client's socket (readable without the server thread running again).
#[test]
fn the_drain_waits_for_answers_the_server_holds() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
    let path = dir.as_path().join("api.sock");
    let s = ApiServer::bind(&path).unwrap();
    let drain = s.drain_handle();
    // Nothing held yet.
    assert!(drain.wait(Duration::from_millis(100)));
    let (tx, rx) = std::sync::mpsc::channel();
    s.spawn(ServerConfig::default(), move |call| {
        let _ = tx.send(call);
    })
    .unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .write_all(b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 33\r\n\r\n{\"action_type\":\"InstanceStart\"}\r\n")
        .unwrap();
    let call = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Held: the VMM has not answered.
    assert!(!drain.wait(Duration::from_millis(50)));
    call.reply(ApiResponse::no_content());
    assert!(drain.wait(Duration::from_secs(5)));
    // Written: the answer is already in this socket.
    client.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    let n = client.read(&mut buf).expect("the answer is in the socket");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}
