use std::time::Duration;

use super::*;

/// A request opening the caller's first HTTP/2 connection makes the
/// caller's next wait; when the first goes away without a connection
/// (its connect failed, or its caller left), the waiting one opens
/// its own at once, not after the 1 s a failed open is remembered.
#[tokio::test(start_paused = true)]
async fn an_open_given_up_lets_the_waiting_requests_open_their_own() {
    let pool = EndpointPool::default();
    let first = pool.take_or_wait(true, None, None, None).await;
    let Err(opening) = first else {
        panic!("an empty pool has no connection to take");
    };
    let waiting = pool.take_or_wait(true, None, None, None);
    tokio::pin!(waiting);
    assert!(
        futures::poll!(waiting.as_mut()).is_pending(),
        "the second request waits for the first one's connection"
    );
    drop(opening);
    let next = tokio::time::timeout(Duration::from_millis(10), waiting).await;
    assert!(
        matches!(next, Ok(Err(_))),
        "the waiting request opens its own once the first gave up"
    );
}

/// HTTP/1.1 requests never wait for another's connection.
#[tokio::test(start_paused = true)]
async fn http1_requests_open_their_own_connections() {
    let pool = EndpointPool::default();
    let first = pool.take_or_wait(false, None, None, None).await;
    let second = pool.take_or_wait(false, None, None, None).await;
    assert!(first.is_err() && second.is_err());
}
