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

/// Portable `2^x`: an exact power of two for the integer part, a table of `2^(j/64)` for the
/// fraction's first six bits and a short series for the rest (error below 1e-15 relative, the
/// same bits everywhere).
pub fn exp2(x: f64) -> f64 {
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
    // f = x - k in [0, 1) and its scalings by 64 are exact: x = k + (j + r) / 64.
    let s = (x - k) * 64.0;
    let j = s.floor();
    // z in [0, ln 2 / 64); e^z by Horner on its Taylor series to z^6: the first term left
    // out, z^7 / 7!, is below 4e-18 for z < 0.0109.
    let z = (s - j) * (std::f64::consts::LN_2 / 64.0);
    let p = 1.0 + z * (1.0 + z * (0.5 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    // Split the power of two so neither factor overflows/underflows prematurely.
    let k = k as i64;
    let half = k / 2;
    TABLE[j as usize] * p * pow2(half) * pow2(k - half)
}

const C3: f64 = 1.0 / 6.0;
const C4: f64 = 1.0 / 24.0;
const C5: f64 = 1.0 / 120.0;
const C6: f64 = 1.0 / 720.0;

/// `2^(j/64)` for j in 0..64, computed at compile time with [`exp2_fraction`].
const TABLE: [f64; 64] = {
    let mut t = [0.0; 64];
    let mut j = 0;
    while j < 64 {
        t[j] = exp2_fraction(j as f64 / 64.0);
        j += 1;
    }
    t
};

/// `2^f` for f in [0, 1): e^(f ln 2) by Horner on 18 Taylor terms (enough for f ln 2 < 0.7),
/// basic IEEE operations only. 18 dependent divisions: used for the table, not per call.
const fn exp2_fraction(f: f64) -> f64 {
    let y = f * std::f64::consts::LN_2;
    let mut sum = 1.0;
    let mut i = 18;
    while i > 0 {
        sum = 1.0 + sum * y / i as f64;
        i -= 1;
    }
    sum
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
    fn exp2_is_within_1e15_of_std_over_the_range_weights_use() {
        // Dense over [-130, 70] (weights lie within 64 half-lives of a landmark, readings
        // further), every table cell and the cells' edges included; std's exp2 is the oracle.
        let mut worst = 0.0f64;
        for i in -130 * 64 * 16..70 * 64 * 16 {
            for x in [i as f64 / 1024.0, i as f64 / 1024.0 + 1e-9, (i as f64 + 0.5) / 1024.0 - 1e-12] {
                let (a, b) = (exp2(x), x.exp2());
                worst = worst.max(((a - b) / b).abs());
            }
        }
        assert!(worst < 1e-15, "worst relative error {worst:e}");
        assert!(exp2(f64::NAN).is_nan());
        assert_eq!(exp2(1024.0), f64::INFINITY);
        assert_eq!(exp2(-1076.0), 0.0);
        for k in -1074..1024 {
            assert_eq!(exp2(k as f64), pow2(k), "2^{k} is exact");
        }
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
