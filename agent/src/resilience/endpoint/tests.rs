//! Outlier detection's state machine, outcome by outcome.

use super::*;

fn settings() -> OutlierSettings {
    OutlierSettings {
        consecutive_failures: 3,
        base_ejection: 1_000,
        max_ejection: 2_500,
        max_ejection_percent: 100,
        half_open_max: 1,
    }
}

fn fail(e: &EndpointState, now: Millis) -> Transition {
    let s = settings();
    let a = e.admit(now, &s).expect("admitted");
    e.report(a, Outcome::ConnectFailed, now, &s, || true)
}

fn hit(e: &EndpointState, outcome: Outcome) -> Transition {
    let s = settings();
    let a = e.admit(0, &s).expect("admitted");
    e.report(a, outcome, 0, &s, || true)
}

const CONNECTED: Outcome = Outcome::Connected { micros: 40 };

/// An endpoint that takes every connection and resets it: each connect
/// succeeds, and it is ejected all the same.
#[test]
fn resets_between_good_connects_still_eject() {
    let e = EndpointState::default();
    for _ in 0..2 {
        assert_eq!(hit(&e, CONNECTED), Transition::None);
        assert_eq!(hit(&e, Outcome::Reset), Transition::None);
    }
    assert_eq!(hit(&e, CONNECTED), Transition::None);
    assert_eq!(
        hit(&e, Outcome::Reset),
        Transition::Ejected { for_ms: 1_000 }
    );
}

/// A connect that succeeds ends a run of connect failures.
#[test]
fn connect_failures_between_good_connects_never_eject() {
    let e = EndpointState::default();
    for _ in 0..10 {
        assert_eq!(hit(&e, Outcome::ConnectFailed), Transition::None);
        assert_eq!(hit(&e, Outcome::ConnectFailed), Transition::None);
        assert_eq!(hit(&e, CONNECTED), Transition::None);
    }
    assert_eq!(e.phase(), Phase::Closed);
}

/// A connection that ends cleanly, or a good answer, ends a run that
/// holds resets; a connect failure after a reset continues it.
#[test]
fn a_clean_end_or_a_good_answer_ends_a_run_of_resets() {
    for good in [Outcome::Closed, Outcome::Answered { micros: 90 }] {
        let e = EndpointState::default();
        assert_eq!(hit(&e, Outcome::Reset), Transition::None);
        assert_eq!(hit(&e, Outcome::Reset), Transition::None);
        assert_eq!(hit(&e, good), Transition::None);
        assert_eq!(hit(&e, Outcome::Reset), Transition::None);
        assert_eq!(hit(&e, CONNECTED), Transition::None);
        assert_eq!(
            hit(&e, Outcome::ConnectFailed),
            Transition::None,
            "{good:?}"
        );
        assert_eq!(
            hit(&e, Outcome::Reset),
            Transition::Ejected { for_ms: 1_000 },
            "{good:?}"
        );
    }
}

#[test]
fn closed_open_half_open_closed() {
    let s = settings();
    let e = EndpointState::default();
    assert_eq!(fail(&e, 0), Transition::None);
    assert_eq!(fail(&e, 0), Transition::None);
    assert_eq!(fail(&e, 0), Transition::Ejected { for_ms: 1_000 });
    assert_eq!(e.phase(), Phase::Open);
    assert!(!e.is_eligible(999, &s));
    assert_eq!(e.admit(999, &s), None);

    // Ejection over: one probe at a time.
    assert!(e.is_eligible(1_000, &s));
    assert_eq!(e.admit(1_000, &s), Some(Admission::Probe));
    assert_eq!(e.phase(), Phase::HalfOpen);
    assert!(!e.is_eligible(1_000, &s));
    assert_eq!(e.admit(1_000, &s), None, "only one probe slot");
    let t = e.report(
        Admission::Probe,
        Outcome::Connected { micros: 50 },
        1_001,
        &s,
        || true,
    );
    assert_eq!(t, Transition::Restored);
    assert_eq!(e.phase(), Phase::Closed);
    assert_eq!(e.admit(1_002, &s), Some(Admission::Normal));
}

#[test]
fn failed_probe_reopens_for_longer_up_to_the_cap() {
    let s = settings();
    let e = EndpointState::default();
    for _ in 0..3 {
        fail(&e, 0);
    }
    assert_eq!(e.ejected_until(), 1_000);
    let a = e.admit(1_000, &s).unwrap();
    assert_eq!(
        e.report(a, Outcome::ConnectFailed, 1_000, &s, || true),
        Transition::Ejected { for_ms: 2_000 }
    );
    let a = e.admit(3_000, &s).unwrap();
    assert_eq!(
        e.report(a, Outcome::Reset, 3_000, &s, || true),
        Transition::Ejected { for_ms: 2_500 },
        "capped at max_ejection"
    );
    assert_eq!(e.ejections(), 3);
}

#[test]
fn success_resets_the_failure_count() {
    let s = settings();
    let e = EndpointState::default();
    fail(&e, 0);
    fail(&e, 0);
    let a = e.admit(0, &s).unwrap();
    e.report(a, Outcome::Connected { micros: 10 }, 0, &s, || true);
    assert_eq!(fail(&e, 0), Transition::None);
    assert_eq!(e.phase(), Phase::Closed);
}

#[test]
fn ejection_refused_keeps_the_endpoint_closed() {
    let s = settings();
    let e = EndpointState::default();
    for _ in 0..2 {
        fail(&e, 0);
    }
    let a = e.admit(0, &s).unwrap();
    assert_eq!(
        e.report(a, Outcome::ConnectFailed, 0, &s, || false),
        Transition::EjectionRefused
    );
    assert_eq!(e.phase(), Phase::Closed);
}

#[test]
fn unhealthy_endpoints_are_never_admitted() {
    let s = settings();
    let e = EndpointState::default();
    assert!(e.set_healthy(false));
    assert!(!e.is_eligible(0, &s));
    assert_eq!(e.admit(0, &s), None);
    assert!(e.set_healthy(true));
    assert!(!e.set_healthy(true));
    assert!(e.is_eligible(0, &s));
}

#[test]
fn ewma_follows_latency_and_weighs_load() {
    let e = Arc::new(EndpointState::default());
    let s = settings();
    e.report(
        Admission::Normal,
        Outcome::Connected { micros: 100 },
        0,
        &s,
        || true,
    );
    assert_eq!(e.ewma_connect_us(), 100);
    e.report(
        Admission::Normal,
        Outcome::Connected { micros: 200 },
        0,
        &s,
        || true,
    );
    assert_eq!(e.ewma_connect_us(), 130);
    let _c = e.open_connection();
    assert_eq!(e.load(false), 2);
    assert_eq!(e.load(true), 260);
}

/// The multiplier of the ejection time starts afresh once the endpoint has
/// been trusted for `max_ejection` (2.5 s here) without an ejection; a
/// relapse sooner is ejected for longer.
#[test]
fn a_long_trusted_spell_starts_the_ejection_multiplier_afresh() {
    let s = settings();
    let e = EndpointState::default();
    let restore = |now: Millis| {
        let probe = e.admit(now, &s).expect("a probe slot");
        assert_eq!(probe, Admission::Probe);
        let t = e.report(probe, Outcome::Connected { micros: 5 }, now, &s, || true);
        assert_eq!(t, Transition::Restored);
    };
    let eject_at = |now: Millis| (0..3).map(|_| fail(&e, now)).last().unwrap();
    assert_eq!(eject_at(0), Transition::Ejected { for_ms: 1_000 });
    restore(1_000);
    // Back after 1 s of trust: twice as long.
    assert_eq!(eject_at(2_000), Transition::Ejected { for_ms: 2_000 });
    restore(4_000);
    // Back after 2.5 s of trust: the base time again.
    assert_eq!(eject_at(6_500), Transition::Ejected { for_ms: 1_000 });
}
