//! Forward exponential decay in event time.
//!
//! An event at time `t` enters decayed sums with weight `2^((t - L) / h)` relative to a
//! landmark `L`; reading at time `T` multiplies by `2^(-(T - L) / h)`. So the state is a plain
//! sum (order-free, mergeable) instead of something rescaled at every event. Landmarks sit on a
//! grid of [`LANDMARK_HALF_LIVES`] half-lives; moving to a later grid point scales every sum by an
//! exact power of two, which loses nothing (barring underflow of long-decayed values).
//!
//! `exp2` is computed here with basic IEEE operations only, so weights are bit-identical on every
//! platform (libm's `exp2` may differ in the last bit between platforms).

/// Landmark grid spacing in half-lives; bounds weights by 2^64 for events before the landmark's
/// successor.
pub const LANDMARK_HALF_LIVES: i64 = 64;

/// The grid landmark for events at `t_ms`, or 0 when nothing decays.
pub fn landmark_for(half_life_ms: i64, t_ms: i64) -> i64 {
    if half_life_ms <= 0 {
        return 0;
    }
    let step = half_life_ms.saturating_mul(LANDMARK_HALF_LIVES);
    t_ms.div_euclid(step) * step
}

/// `2^((t - landmark) / h)`, or 1 when nothing decays.
pub fn weight(half_life_ms: i64, landmark_ms: i64, t_ms: i64) -> f64 {
    if half_life_ms <= 0 {
        return 1.0;
    }
    let x = (t_ms as f64 - landmark_ms as f64) / half_life_ms as f64;
    exp2(x)
}

/// Factor that rescales sums kept at `from` landmark to the later landmark `to`: `2^-k` with `k`
/// a whole number of half-lives, exact in binary floating point.
pub fn rebase_factor(half_life_ms: i64, from: i64, to: i64) -> f64 {
    if half_life_ms <= 0 || to <= from {
        return 1.0;
    }
    let k = (to - from) / half_life_ms;
    pow2(-k)
}

/// Exact `2^k` for integer `k` (0 below the subnormal range, infinity above).
pub fn pow2(k: i64) -> f64 {
    if k > 1023 {
        f64::INFINITY
    } else if k >= -1022 {
        f64::from_bits(((k + 1023) as u64) << 52)
    } else if k >= -1074 {
        f64::from_bits(1u64 << (k + 1074))
    } else {
        0.0
    }
}

/// Portable `2^x`: exact power of two for the integer part times a fixed-length series for the
/// fraction (error below 1e-15 relative, the same bits everywhere).
pub fn exp2(x: f64) -> f64 {
    // The series costs 18 dependent divisions, and at a shop's rates many events share a
    // millisecond (and so, within a model, the same x): a small per-thread memo of results
    // returns the very bits the series would.
    thread_local! {
        static MEMO: [std::cell::Cell<(u64, f64)>; MEMO_SLOTS] =
            const { [const { std::cell::Cell::new((EMPTY_KEY, 0.0)) }; MEMO_SLOTS] };
    }
    let bits = x.to_bits();
    let slot = (bits ^ (bits >> 29) ^ (bits >> 47)) as usize % MEMO_SLOTS;
    MEMO.with(|memo| {
        let (key, y) = memo[slot].get();
        if key == bits && bits != EMPTY_KEY {
            return y;
        }
        let y = exp2_series(x);
        memo[slot].set((bits, y));
        y
    })
}

const MEMO_SLOTS: usize = 8;

/// A key no memo entry holds: a NaN's bits (NaN is answered before the series).
const EMPTY_KEY: u64 = u64::MAX;

fn exp2_series(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x >= 1024.0 {
        return f64::INFINITY;
    }
    if x < -1075.0 {
        return 0.0;
    }
    let k = x.floor();
    let f = x - k; // in [0, 1)
                   // e^(f ln 2) by Horner on the Taylor series; 18 terms suffice for |f ln2| < 0.7.
    let y = f * std::f64::consts::LN_2;
    let mut sum = 1.0;
    let mut i = 18;
    while i > 0 {
        sum = 1.0 + sum * y / i as f64;
        i -= 1;
    }
    // Split the power of two so neither factor overflows/underflows prematurely.
    let k = k as i64;
    let half = k / 2;
    sum * pow2(half) * pow2(k - half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_matches_std_closely() {
        for i in -4000..4000 {
            let x = i as f64 * 0.0137;
            let (a, b) = (exp2(x), x.exp2());
            assert!(((a - b) / b).abs() < 1e-14, "x={x} ours={a} std={b}");
        }
    }

    #[test]
    fn the_memo_returns_the_series_bits() {
        // Alternating and repeated arguments, colliding slots included.
        let xs: Vec<f64> = (0..2000).map(|i| ((i * 7919) % 613) as f64 * -0.173 + 0.01).collect();
        for _ in 0..3 {
            for &x in &xs {
                assert_eq!(exp2(x).to_bits(), exp2_series(x).to_bits(), "x={x}");
            }
        }
        assert!(exp2(f64::NAN).is_nan());
    }

    #[test]
    fn pow2_is_exact() {
        assert_eq!(pow2(0), 1.0);
        assert_eq!(pow2(10), 1024.0);
        assert_eq!(pow2(-1), 0.5);
        assert_eq!(pow2(-1074), f64::from_bits(1));
        assert_eq!(pow2(-1075), 0.0);
    }

    #[test]
    fn rebasing_preserves_decayed_value() {
        let h = 3_600_000;
        let l0 = landmark_for(h, 1_700_000_000_000);
        let l1 = l0 + h * LANDMARK_HALF_LIVES;
        let t = l1 + 5 * h / 2;
        let w_old = weight(h, l0, t) * rebase_factor(h, l0, l1);
        let w_new = weight(h, l1, t);
        assert!(((w_old - w_new) / w_new).abs() < 1e-15);
    }

    #[test]
    fn no_decay_means_weight_one() {
        assert_eq!(weight(0, 0, 123_456), 1.0);
        assert_eq!(landmark_for(0, 99), 0);
    }
}
