//! The attribution join, specified by scenarios: a sequence of events in arrival order and the
//! outcome counters it must end with.

use banditflow::core::event::{Event, FeedbackKind::*, Variant};
use banditflow::core::join::JoinCounters;
use banditflow::core::params::JoinSpec;

use crate::support::*;

fn bounded() -> JoinSpec {
    JoinSpec {
        watermark_delay_ms: 0,
        grace_ms: 5 * MIN,
        late_retention_ms: DAY,
        learn_late: true,
        max_impressions: 1000,
        max_pending_feedback: 1000,
        funnel: [0; 4],
    }
}

fn imp(id: &str, t: i64) -> Event {
    Event::Impression(impression(id, "pbm", t, Variant::Treatment, "women", &["a", "b", "c"]))
}

fn fb(id: &str, item: &str, pos: u32, kind: banditflow::core::event::FeedbackKind, t: i64) -> Event {
    Event::Feedback(feedback(id, item, pos, kind, t))
}

fn counters(join: JoinSpec, events: &[Event]) -> (JoinCounters, Feeder) {
    let spec = spec_with_join(join);
    let mut f = Feeder::new(&spec, 0);
    for e in events {
        f.feed(&spec, e);
    }
    (f.state.join.counters.clone(), f)
}

#[test]
fn scenarios() {
    struct Case {
        name: &'static str,
        join: JoinSpec,
        events: Vec<Event>,
        expect: JoinCounters,
    }
    let c = JoinCounters::default;
    let cases = vec![
        Case {
            name: "feedback within its window is attributed",
            join: bounded(),
            events: vec![
                imp("i", T0),
                fb("i", "b", 2, Click, T0 + MIN),
                fb("i", "b", 2, Purchase, T0 + 2 * HOUR),
            ],
            expect: JoinCounters { impressions_learned: 1, feedback_attributed: 2, ..c() },
        },
        Case {
            name: "a repeated impression and a repeated feedback are dropped",
            join: bounded(),
            events: vec![
                imp("i", T0),
                imp("i", T0),
                fb("i", "a", 1, Click, T0 + 1),
                fb("i", "a", 1, Click, T0 + 1),
            ],
            expect: JoinCounters {
                impressions_learned: 1,
                impressions_duplicate: 1,
                feedback_attributed: 1,
                feedback_duplicate: 1,
                ..c()
            },
        },
        Case {
            name: "feedback before its impression is held, then attributed",
            join: bounded(),
            events: vec![fb("i", "a", 1, Click, T0 + 10), imp("i", T0)],
            expect: JoinCounters { impressions_learned: 1, feedback_held: 1, feedback_attributed: 1, ..c() },
        },
        Case {
            name: "held feedback is orphaned once the watermark passes its grace period",
            join: bounded(),
            events: vec![fb("i", "a", 1, Click, T0), imp("other", T0 + 6 * MIN), imp("i", T0 + 6 * MIN)],
            expect: JoinCounters { impressions_learned: 2, feedback_held: 1, feedback_orphaned: 1, ..c() },
        },
        Case {
            name: "a click after its 1 h window is late and learned",
            join: bounded(),
            events: vec![imp("i", T0), fb("i", "a", 1, Click, T0 + 2 * HOUR)],
            expect: JoinCounters { impressions_learned: 1, feedback_late_learned: 1, ..c() },
        },
        Case {
            name: "late feedback is counted but not learned when learn_late is off",
            join: JoinSpec { learn_late: false, ..bounded() },
            events: vec![
                imp("i", T0),
                fb("i", "a", 1, Click, T0 + 2 * HOUR),
                fb("i", "a", 1, Click, T0 + 2 * HOUR),
            ],
            expect: JoinCounters {
                impressions_learned: 1,
                feedback_late_ignored: 1,
                feedback_duplicate: 1,
                ..c()
            },
        },
        Case {
            name: "feedback after the impression's retention is held and then orphaned",
            join: bounded(),
            // retention = longest window (30 d) + 1 d
            events: vec![
                imp("i", T0),
                imp("j", T0 + 32 * DAY),
                fb("i", "a", 1, Return, T0 + 32 * DAY),
                imp("k", T0 + 33 * DAY),
            ],
            expect: JoinCounters {
                impressions_learned: 3,
                impressions_expired: 1,
                feedback_held: 1,
                feedback_orphaned: 1,
                ..c()
            },
        },
        Case {
            name: "opted-out impressions and their feedback are counted, never learned",
            join: bounded(),
            events: vec![
                Event::Impression({
                    let mut i = impression("o", "pbm", T0, Variant::Treatment, "women", &["a"]);
                    i.opted_out = true;
                    i
                }),
                fb("o", "a", 1, Click, T0 + 1),
            ],
            expect: JoinCounters { impressions_opted_out: 1, feedback_opted_out: 1, ..c() },
        },
        Case {
            name: "feedback for an item or position the impression did not show",
            join: bounded(),
            events: vec![imp("i", T0), fb("i", "z", 1, Click, T0 + 1), fb("i", "a", 2, Click, T0 + 1)],
            expect: JoinCounters { impressions_learned: 1, feedback_not_in_slate: 2, ..c() },
        },
        Case {
            name: "at the impression cap the oldest impression is evicted",
            join: JoinSpec { max_impressions: 2, ..bounded() },
            events: vec![imp("x", T0 + 2), imp("y", T0), imp("z", T0 + 1), fb("y", "a", 1, Click, T0 + 5)],
            expect: JoinCounters { impressions_learned: 3, impressions_evicted: 1, feedback_held: 1, ..c() },
        },
        Case {
            name: "at the held-feedback cap the oldest held feedback is evicted",
            join: JoinSpec { max_pending_feedback: 2, ..bounded() },
            events: vec![
                fb("p", "a", 1, Click, T0 + 2),
                fb("q", "a", 1, Click, T0),
                fb("r", "a", 1, Click, T0 + 1),
                imp("q", T0),
            ],
            expect: JoinCounters { impressions_learned: 1, feedback_held: 3, feedback_evicted: 1, ..c() },
        },
    ];
    let mut failures = Vec::new();
    for case in cases {
        let (got, f) = counters(case.join, &case.events);
        if got != case.expect {
            failures.push(format!("{}:\n  expected {:?}\n  got      {:?}", case.name, case.expect, got));
        }
        // Conservation: every feedback event is final or still held.
        let feedback_in = case.events.iter().filter(|e| matches!(e, Event::Feedback(_))).count() as u64;
        let accounted = got.feedback_final() + f.state.join.pending_feedback() as u64;
        if feedback_in != accounted {
            failures.push(format!("{}: {feedback_in} feedback in, {accounted} accounted for", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cascade_examines_down_to_the_deepest_feedback() {
    let spec = unbounded_spec();
    let mut f = Feeder::new(&spec, 0);
    // Model "lin" uses cascade and no decay within a day matters; positions: a=1, b=2, c=3, d=4.
    let i = impression("i", "lin", T0, Variant::Treatment, "women", &["a", "b", "c", "d"]);
    f.feed(&spec, &Event::Impression(i));
    let exposure = |f: &Feeder, item: &str| f.state.models[1].arms["women"][item].exposure;
    let w = exposure(&f, "a");
    assert!(w > 0.0);
    // No click yet: every item counts as examined.
    for item in ["a", "b", "c", "d"] {
        assert_eq!(exposure(&f, item), w, "{item} before any click");
    }
    // A click at position 2: items below it were perhaps never seen.
    f.feed(&spec, &Event::Feedback(feedback("i", "b", 2, Click, T0 + 1)));
    assert_eq!((exposure(&f, "a"), exposure(&f, "b")), (w, w));
    assert_eq!((exposure(&f, "c"), exposure(&f, "d")), (0.0, 0.0));
    // A purchase at position 3 extends the examined set to it.
    f.feed(&spec, &Event::Feedback(feedback("i", "c", 3, Purchase, T0 + 2)));
    assert_eq!((exposure(&f, "c"), exposure(&f, "d")), (w, 0.0));
    // A click above the deepest feedback changes nothing.
    f.feed(&spec, &Event::Feedback(feedback("i", "a", 1, Click, T0 + 3)));
    assert_eq!((exposure(&f, "a"), exposure(&f, "b"), exposure(&f, "c"), exposure(&f, "d")), (w, w, w, 0.0));
}

#[test]
fn position_based_exposure_uses_the_examination_weights() {
    let spec = unbounded_spec();
    let mut f = Feeder::new(&spec, 0);
    f.feed(
        &spec,
        &Event::Impression(impression("i", "pbm", T0, Variant::Treatment, "men", &["a", "b", "c", "d"])),
    );
    let arms = &f.state.models[0].arms["men"];
    let a = arms["a"].exposure;
    // Configured weights [1.0, 0.7, 0.5]; positions past the list use the last weight.
    let ratios: Vec<f64> = ["b", "c", "d"].iter().map(|i| arms[*i].exposure / a).collect();
    assert!(
        (ratios[0] - 0.7).abs() < 1e-12 && (ratios[1] - 0.5).abs() < 1e-12 && (ratios[2] - 0.5).abs() < 1e-12,
        "{ratios:?}"
    );
}

#[test]
fn decay_halves_old_evidence_per_half_life() {
    let spec = unbounded_spec();
    let mut f = Feeder::new(&spec, 0);
    f.feed(&spec, &Event::Impression(impression("old", "pbm", T0, Variant::Treatment, "men", &["a"])));
    f.feed(&spec, &Event::Impression(impression("new", "pbm", T0 + DAY, Variant::Treatment, "men", &["b"])));
    let m = &f.state.models[0];
    // Model "pbm" has a half-life of one day.
    let (a, b) = (m.arms["men"]["a"].exposure, m.arms["men"]["b"].exposure);
    assert!((b / a - 2.0).abs() < 1e-12, "{a} {b}");
    // Read a day later, the newer impression weighs one exposure.
    assert!((b * m.read_factor(&spec.models[0], T0 + DAY) - 1.0).abs() < 1e-12);
}

#[test]
fn variant_rewards_and_lift_are_exact() {
    let spec = unbounded_spec();
    let mut f = Feeder::new(&spec, 0);
    let mut n = 0;
    for (variant, clicks) in [(Variant::Treatment, 3), (Variant::Holdout, 1)] {
        for k in 0..4 {
            let id = format!("{variant}-{k}");
            f.feed(&spec, &Event::Impression(impression(&id, "pbm", T0 + n, variant.clone(), "men", &["a"])));
            if k < clicks {
                f.feed(&spec, &Event::Feedback(feedback(&id, "a", 1, Click, T0 + n + 1)));
                f.feed(&spec, &Event::Feedback(feedback(&id, "a", 1, Purchase, T0 + n + 2)));
            }
            n += 10;
        }
    }
    let v = &f.state.models[0].variants;
    let t = &v[&Variant::Treatment];
    assert_eq!(
        (t.impressions, t.reward_micros, t.reward_sq_micros2),
        (4, 18_000_000, 3 * 36_000_000_000_000)
    );
    let l = banditflow::core::model::lift(t, &v[&Variant::Holdout]).expect("both variants");
    assert_eq!((l.treatment_mean, l.holdout_mean, l.diff), (4.5, 1.5, 3.0));
}

fn funnel() -> JoinSpec {
    JoinSpec { late_retention_ms: HOUR, funnel: banditflow::core::params::DEFAULT_FUNNEL, ..bounded() }
}

/// Funnel retention, end to end: purchases and returns that come days and weeks later are
/// attributed to the clicked impression they belong to, while impressions nobody clicked are
/// released after the click window (plus late retention), and feedback for those is counted
/// under its own outcome. Windows (support::rewards): click 1 h, cart 1 d, purchase 7 d,
/// return 30 d; the default funnel: cart and purchase need a click, a return needs a purchase.
#[test]
fn the_funnel_keeps_what_can_still_convert_and_releases_the_rest() {
    let spec = spec_with_join(funnel());
    let mut f = Feeder::new(&spec, 0);
    let buffered = |f: &Feeder| f.state.join.buffered_impressions();
    for id in ["a", "b", "c"] {
        f.feed(&spec, &imp(id, T0));
    }
    f.feed(&spec, &fb("a", "b", 2, Click, T0 + 10 * MIN));
    // 2 h 1 min later: the unclicked impressions have passed click window + late retention.
    f.feed(&spec, &imp("d", T0 + 2 * HOUR + MIN));
    assert_eq!(buffered(&f), 2, "a (clicked) and d are retained; b and c are released");
    assert_eq!(f.state.join.counters.impressions_expired, 2);
    // Three days later: a's purchase is attributed; b's purchase finds nothing, and so does a
    // click on c long after its window.
    f.feed(&spec, &fb("a", "b", 2, Purchase, T0 + 3 * DAY));
    f.feed(&spec, &fb("b", "a", 1, Purchase, T0 + 3 * DAY));
    f.feed(&spec, &fb("c", "a", 1, Click, T0 + 3 * DAY));
    // Ten days: a was purchased, so it waits for a return (30 d); d (never clicked) is gone.
    f.feed(&spec, &imp("e", T0 + 10 * DAY));
    assert_eq!(buffered(&f), 2, "a (purchased) and e");
    // Twenty days: the return is attributed to a.
    f.feed(&spec, &fb("a", "b", 2, Return, T0 + 20 * DAY));
    // 31 days: a is released after its return window.
    f.feed(&spec, &imp("g", T0 + 30 * DAY + HOUR + MIN));
    assert_eq!(buffered(&f), 1, "only g");
    let got = f.state.join.counters.clone();
    let want = JoinCounters {
        impressions_learned: 6,
        impressions_expired: 5,
        feedback_attributed: 3,
        feedback_held: 2,
        feedback_released: 1,
        feedback_orphaned: 1,
        ..JoinCounters::default()
    };
    assert_eq!(got, want);
    // What was attributed was learned: item b in segment women has a click, a purchase and a
    // return (model 0, Beta + configured examination).
    let arm = &f.state.models[0].arms["women"]["b"];
    assert_eq!((arm.impressions, arm.feedback), (6, [1, 0, 1, 1]), "{arm:?}");
}

/// Without a funnel (every kind needs nothing), every impression is kept for the longest
/// window: the same stream keeps all impressions and attributes the same feedback, except that
/// b's purchase now finds its (unclicked) impression.
#[test]
fn without_a_funnel_every_impression_is_kept_for_the_longest_window() {
    let spec = spec_with_join(JoinSpec { funnel: [0; 4], ..funnel() });
    let mut f = Feeder::new(&spec, 0);
    for id in ["a", "b", "c"] {
        f.feed(&spec, &imp(id, T0));
    }
    f.feed(&spec, &fb("a", "b", 2, Click, T0 + 10 * MIN));
    f.feed(&spec, &imp("d", T0 + 2 * HOUR + MIN));
    assert_eq!(f.state.join.buffered_impressions(), 4);
    f.feed(&spec, &fb("b", "a", 1, Purchase, T0 + 3 * DAY));
    assert_eq!(f.state.join.counters.feedback_attributed, 2);
    assert_eq!(f.state.join.counters.feedback_released, 0);
}

/// A cart opens the purchase window without a click when the funnel says so, and a shown item
/// of a clicked impression can still be clicked within the click window.
#[test]
fn each_item_of_a_slate_follows_its_own_funnel() {
    let spec = spec_with_join(funnel());
    let mut f = Feeder::new(&spec, 0);
    f.feed(&spec, &imp("i", T0));
    f.feed(&spec, &fb("i", "a", 1, Click, T0 + MIN));
    // c was not clicked: its purchase two days later is not the funnel's, but the impression is
    // retained (a was clicked), so it is attributed like any feedback within its window.
    f.feed(&spec, &imp("x", T0 + 2 * DAY));
    f.feed(&spec, &fb("i", "c", 3, Purchase, T0 + 2 * DAY));
    assert_eq!(f.state.join.counters.feedback_attributed, 2);
    // After the purchase window (7 d + 1 h), nothing opened the return window for a, but c was
    // purchased: the impression stays for c's return.
    f.feed(&spec, &imp("y", T0 + 8 * DAY));
    assert!(f.state.join.buffer.contains(banditflow::core::buffer::Key::of("i")));
    f.feed(&spec, &imp("z", T0 + 31 * DAY));
    assert!(!f.state.join.buffer.contains(banditflow::core::buffer::Key::of("i")));
}
