//! KeyUpdates: the peer's followed and answered, ours sent on request and
//! near the suite's limit, before and after a resume; and our derivation
//! of the next keys is rustls's.

use rustls::crypto::tls13::OkmBlock;

use super::*;

/// Whether `keys` moved exactly one generation on from `before`.
fn one_generation_on(keys: &TrafficKeys, before: &OkmBlock) -> bool {
    keys.suite.next_secret(before).as_ref() == keys.secret().as_ref()
}

#[tokio::test]
async fn the_peers_key_updates_are_followed_and_answered_before_and_after_a_resume() {
    let pki = pki();
    let (mut ours, mut theirs) = our_server(&pki).await;
    for round in 0..2u8 {
        let rx_before = ours.rx.keys.secret().clone();
        let tx_before = ours.tx.keys.secret().clone();
        // rustls asks for ours with its own KeyUpdate, sent before its data.
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        let request = pattern(40_000, round);
        theirs.write_all(&request).await.unwrap();
        theirs.flush().await.unwrap();
        let mut got = vec![0u8; request.len()];
        ours.read_exact(&mut got).await.unwrap();
        assert_same(&got, &request, "the peer's data under its new keys");
        assert!(one_generation_on(&ours.rx.keys, &rx_before), "{round}");
        if round == 0 {
            // The answer still owed travels with the state.
            ours = suspend_and_resume(ours).await.0;
        }
        // Ours goes out before our next record.
        let answer = pattern(30_000, round + 10);
        ours.write_all(&answer).await.unwrap();
        ours.flush().await.unwrap();
        assert!(one_generation_on(&ours.tx.keys, &tx_before), "{round}");
        let mut got = vec![0u8; answer.len()];
        theirs.read_exact(&mut got).await.unwrap();
        assert_same(&got, &answer, "our data under our new keys");
    }
}

#[tokio::test]
async fn our_key_updates_are_followed_by_rustls_before_and_after_a_resume() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    for round in 0..2u8 {
        let rx_before = ours.rx.keys.secret().clone();
        let tx_before = ours.tx.keys.secret().clone();
        ours.refresh_traffic_keys();
        if round == 0 {
            // The renewal asked for travels with the state.
            ours = suspend_and_resume(ours).await.0;
        }
        let request = pattern(40_000, round);
        ours.write_all(&request).await.unwrap();
        ours.flush().await.unwrap();
        assert!(one_generation_on(&ours.tx.keys, &tx_before), "{round}");
        let mut got = vec![0u8; request.len()];
        theirs.read_exact(&mut got).await.unwrap();
        assert_same(&got, &request, "our data under our new keys");
        // We asked for the peer's: it comes before its next record.
        let answer = pattern(30_000, round + 10);
        theirs.write_all(&answer).await.unwrap();
        theirs.flush().await.unwrap();
        let mut got = vec![0u8; answer.len()];
        ours.read_exact(&mut got).await.unwrap();
        assert_same(&got, &answer, "the peer's data under its new keys");
        assert!(one_generation_on(&ours.rx.keys, &rx_before), "{round}");
    }
}

#[tokio::test]
async fn our_keys_are_renewed_before_the_suites_limit() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    let limit = ours.tx.keys.suite.confidentiality_limit();
    assert_eq!(limit, 1 << 24, "AES-256-GCM's");
    assert_eq!(ours.tx.update_at, limit - 1);
    // As if the keys had sealed all but two of their records.
    ours.tx.update_at = ours.tx.keys.seq + 2;
    let before = ours.tx.keys.secret().clone();
    let data = pattern(5 * 16_384, 0x33);
    ours.write_all(&data).await.unwrap();
    ours.flush().await.unwrap();
    assert!(one_generation_on(&ours.tx.keys, &before));
    assert_eq!(ours.tx.keys.seq, 3, "records after the KeyUpdate");
    assert_eq!(ours.tx.update_at, limit - 1, "a fresh budget");
    let mut got = vec![0u8; data.len()];
    theirs.read_exact(&mut got).await.unwrap();
    assert_same(&got, &data, "data across our renewal");
}

/// rustls's KernelConnection renews the keys of a session our client made;
/// our derivation from the logged secret gives the same keys, twice over.
#[tokio::test]
async fn our_next_keys_are_rustls_kernel_connections() {
    let pki = pki();
    let (mut ours, _theirs) = our_client(&pki).await;
    let suite = ours.tx.keys.suite;
    let kernel = ours
        .rx
        .tickets
        .as_mut()
        .expect("the client keeps rustls's half");
    let (mut tx, mut rx) = (ours.tx.keys.secret().clone(), ours.rx.keys.secret().clone());
    for generation in 1..=2 {
        let (seq, theirs_tx) = kernel.update_tx_secret().unwrap();
        let (_, theirs_rx) = kernel.update_rx_secret().unwrap();
        assert_eq!(seq, 0);
        assert!(
            !suite.yields(&tx, &theirs_tx),
            "the old keys are not the new"
        );
        tx = suite.next_secret(&tx);
        rx = suite.next_secret(&rx);
        assert!(
            suite.yields(&tx, &theirs_tx),
            "sending, generation {generation}"
        );
        assert!(
            suite.yields(&rx, &theirs_rx),
            "receiving, generation {generation}"
        );
    }
}
