//! Real `h2::Error`s for tests, as a peer's frames make them (an error built
//! with `h2::Error::from(reason)` is neither a reset nor remote).

/// The error stream 1 fails with when the server, after its SETTINGS,
/// sends `frame` (raw HTTP/2 bytes).
async fn error_after(frame: &[u8]) -> h2::Error {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
    let (client, connection) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .uri("http://catalog/a.B/C")
        .body(())
        .unwrap();
    let (response, _body) = client.send_request(request, true).unwrap();
    let mut preface = [0u8; 24];
    server_io.read_exact(&mut preface).await.unwrap();
    server_io
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    // Wait for stream 1's HEADERS (a reset of an idle stream is a
    // protocol error), skipping the client's other frames.
    loop {
        let mut head = [0u8; 9];
        server_io.read_exact(&mut head).await.unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        server_io.read_exact(&mut payload).await.unwrap();
        if head[3] == 1 {
            break;
        }
    }
    server_io.write_all(frame).await.unwrap();
    // Then the server closes its side of the connection.
    server_io.shutdown().await.unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(5), response)
        .await
        .expect("the stream fails")
        .unwrap_err();
    drop(server_io);
    err
}

/// The server reset stream 1 (`RST_STREAM`) with `reason`.
pub(crate) async fn remote_reset(reason: h2::Reason) -> h2::Error {
    let code = u32::from(reason).to_be_bytes();
    let frame = [
        0, 0, 4, 3, 0, 0, 0, 0, 1, code[0], code[1], code[2], code[3],
    ];
    let err = error_after(&frame).await;
    assert!(err.is_reset() && err.is_remote(), "{err:?}");
    err
}

/// The server sent `GOAWAY(last_stream, reason)`.
pub(crate) async fn remote_go_away(last_stream: u32, reason: h2::Reason) -> h2::Error {
    let last = last_stream.to_be_bytes();
    let code = u32::from(reason).to_be_bytes();
    let frame = [
        0, 0, 8, 7, 0, 0, 0, 0, 0, last[0], last[1], last[2], last[3], code[0], code[1], code[2],
        code[3],
    ];
    let err = error_after(&frame).await;
    assert!(err.is_go_away() && err.is_remote(), "{err:?}");
    err
}
