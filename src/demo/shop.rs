//! A simulated fashion shop calibrated on ZOZOTOWN's production priors.
//!
//! Item appeal comes from the Beta(α, β) priors ZOZOTOWN's Bernoulli Thompson sampling used in
//! production, shipped in the Open Bandit Pipeline (`obp` 0.5.7, `obp/policy/conf/prior_bts.yaml`,
//! fetched by `scripts/zozotown_priors.py`, never vendored). Each campaign ("all", "men",
//! "women") is a segment with its own catalogue; an item's true click probability when examined
//! is one draw from its prior (α + β ≥ 2,000, so the draw is close to the prior mean) times
//! `ctr_scale`, which keeps ZOZOTOWN's relative appeal of items (best ≈ 5 × worst) while giving
//! a short demo enough clicks.
//!
//! Shoppers follow the position-based model: position p is examined with probability
//! `examination[p]`, an examined item is clicked with its appeal; a click leads to an add to
//! cart, a cart to a purchase and a purchase to a return with fixed probabilities, each after an
//! exponential delay. At `shift_at_ms` the appeals of each catalogue are permuted (a trend
//! shift): the shop's favourites change and the model has to follow.
//!
//! Everything is seeded; the shop reads no clock (elapsed time comes in as an argument).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context as _};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, Exp, LogNormal};
use serde::Deserialize;

use crate::core::event::FeedbackKind;

/// The priors file written by `scripts/zozotown_priors.py`.
#[derive(Debug, Clone, Deserialize)]
pub struct Priors {
    pub source: String,
    pub sha256: String,
    pub campaigns: BTreeMap<String, CampaignPriors>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CampaignPriors {
    pub alpha: Vec<f64>,
    pub beta: Vec<f64>,
}

impl Priors {
    pub fn load(path: &Path) -> anyhow::Result<Priors> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let p: Priors = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a priors file", path.display()))?;
        if p.campaigns.is_empty() {
            bail!("{}: no campaigns", path.display());
        }
        for (name, c) in &p.campaigns {
            if c.alpha.is_empty() || c.alpha.len() != c.beta.len() {
                bail!("{}: campaign `{name}` needs as many alphas as betas (≥ 1)", path.display());
            }
            if c.alpha.iter().chain(&c.beta).any(|v| !v.is_finite() || *v <= 0.0) {
                bail!("{}: campaign `{name}` has a non-positive or non-finite parameter", path.display());
            }
        }
        Ok(p)
    }
}

#[derive(Debug, Clone)]
pub struct ShopSpec {
    pub seed: u64,
    /// Multiplies every prior mean (click probability of an examined item); capped at 0.95.
    pub ctr_scale: f64,
    /// Examination probability per position (1-based position p at index p − 1).
    pub examination: Vec<f64>,
    pub slate_size: usize,
    /// Share of visits per campaign (normalised); campaigns missing here get none.
    pub traffic: Vec<(String, f64)>,
    /// Distinct shoppers (user keys `u<n>`).
    pub shoppers: u64,
    pub p_cart: f64,
    pub p_purchase: f64,
    pub p_return: f64,
    /// Mean delays (ms) from impression to click, click to cart, cart to purchase, purchase to return.
    pub mean_delay_ms: [f64; 4],
    /// Elapsed ms at which every catalogue's appeals are permuted (None: never).
    pub shift_at_ms: Option<i64>,
}

impl Default for ShopSpec {
    fn default() -> ShopSpec {
        ShopSpec {
            seed: 42,
            ctr_scale: 20.0,
            examination: vec![1.0, 0.85, 0.72, 0.62, 0.54, 0.47, 0.42, 0.38, 0.34, 0.31],
            slate_size: 10,
            // Roughly the relative sizes of the three campaigns' logs in the Open Bandit Dataset.
            traffic: vec![("all".into(), 0.5), ("men".into(), 0.18), ("women".into(), 0.32)],
            shoppers: 200_000,
            p_cart: 0.3,
            p_purchase: 0.4,
            p_return: 0.2,
            mean_delay_ms: [700.0, 1_500.0, 2_500.0, 5_000.0],
            shift_at_ms: None,
        }
    }
}

/// One campaign: a segment with its catalogue (in catalogue order, the holdout's order).
#[derive(Debug, Clone)]
pub struct Campaign {
    pub segment: String,
    pub items: Vec<String>,
    /// Click probability of an examined item, before and after the trend shift.
    pub appeal: Vec<f64>,
    pub appeal_after_shift: Vec<f64>,
    index: HashMap<String, usize>,
}

/// A planned feedback event: due `delay_ms` after the impression.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub item_id: String,
    pub position: u32,
    pub kind: FeedbackKind,
    pub value: f64,
    pub delay_ms: i64,
}

/// How a shopper reacted to a slate, with the expectations the results are judged by.
#[derive(Debug, Clone)]
pub struct Reaction {
    pub feedback: Vec<Planned>,
    pub clicks: u32,
    /// Expected clicks of the served slate, of the best slate and of a uniformly random slate,
    /// under the appeals in force (the simulator's truth).
    pub expected_clicks: f64,
    pub oracle_clicks: f64,
    pub random_clicks: f64,
}

pub struct Shop {
    pub spec: ShopSpec,
    pub campaigns: Vec<Campaign>,
    traffic: Vec<f64>,
    rng: ChaCha8Rng,
}

impl Shop {
    pub fn new(priors: &Priors, spec: ShopSpec) -> anyhow::Result<Shop> {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut campaigns = Vec::new();
        let mut traffic = Vec::new();
        for (name, share) in &spec.traffic {
            let Some(c) = priors.campaigns.get(name) else {
                bail!(
                    "the priors have no campaign `{name}` (they have {:?})",
                    priors.campaigns.keys().collect::<Vec<_>>()
                );
            };
            let mut appeal = Vec::with_capacity(c.alpha.len());
            for (&a, &b) in c.alpha.iter().zip(&c.beta) {
                let truth = Beta::new(a, b).map_or(a / (a + b), |d| d.sample(&mut rng));
                appeal.push((truth * spec.ctr_scale).min(0.95));
            }
            let mut appeal_after_shift = appeal.clone();
            appeal_after_shift.shuffle(&mut rng);
            let items: Vec<String> = (0..appeal.len()).map(|i| format!("{name}-{i:03}")).collect();
            let index = items.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect();
            campaigns.push(Campaign { segment: name.clone(), items, appeal, appeal_after_shift, index });
            traffic.push(share.max(0.0));
        }
        let total: f64 = traffic.iter().sum();
        if campaigns.is_empty() || total <= 0.0 {
            bail!("the shop needs at least one campaign with positive traffic");
        }
        let traffic = traffic.iter().map(|t| t / total).collect();
        Ok(Shop { spec, campaigns, traffic, rng })
    }

    /// The next visit: (campaign index, user key).
    pub fn next_visit(&mut self) -> (usize, String) {
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        let mut c = self.campaigns.len() - 1;
        for (i, t) in self.traffic.iter().enumerate() {
            acc += t;
            if u < acc {
                c = i;
                break;
            }
        }
        (c, format!("u{}", self.rng.random_range(0..self.spec.shoppers.max(1))))
    }

    /// Appeals in force `elapsed_ms` into the run.
    pub fn appeal(&self, campaign: usize, elapsed_ms: i64) -> &[f64] {
        let c = &self.campaigns[campaign];
        match self.spec.shift_at_ms {
            Some(at) if elapsed_ms >= at => &c.appeal_after_shift,
            _ => &c.appeal,
        }
    }

    fn exam(&self, position: u32) -> f64 {
        let e = &self.spec.examination;
        e.get(position as usize - 1).or(e.last()).copied().unwrap_or(1.0)
    }

    /// Expected clicks of the best slate (most appealing items at the most examined positions)
    /// and of a uniformly random one.
    pub fn benchmarks(&self, campaign: usize, slate: usize, elapsed_ms: i64) -> (f64, f64) {
        let appeal = self.appeal(campaign, elapsed_ms);
        let k = slate.min(appeal.len());
        let mut sorted = appeal.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let exam: Vec<f64> = (1..=k as u32).map(|p| self.exam(p)).collect();
        let oracle = sorted.iter().zip(&exam).map(|(a, e)| a * e).sum();
        let mean = appeal.iter().sum::<f64>() / appeal.len() as f64;
        (oracle, exam.iter().sum::<f64>() * mean)
    }

    /// How a shopper reacts to `slate` (item id, 1-based position) of `campaign`. Unknown item
    /// ids are never clicked.
    pub fn react(&mut self, campaign: usize, slate: &[(String, u32)], elapsed_ms: i64) -> Reaction {
        let (oracle_clicks, random_clicks) = self.benchmarks(campaign, slate.len(), elapsed_ms);
        let mut feedback = Vec::new();
        let mut clicks = 0;
        let mut expected_clicks = 0.0;
        let delays: Vec<Exp<f64>> =
            self.spec.mean_delay_ms.iter().filter_map(|m| Exp::new(1.0 / m.max(1.0)).ok()).collect();
        let price: Option<LogNormal<f64>> = LogNormal::new(3.9, 0.5).ok(); // median ≈ 50 (currency units)
        for (item, position) in slate {
            let appeal = match self.campaigns[campaign].index.get(item) {
                Some(&i) => self.appeal(campaign, elapsed_ms)[i],
                None => 0.0,
            };
            let exam = self.exam(*position);
            expected_clicks += exam * appeal;
            if !(self.rng.random::<f64>() < exam && self.rng.random::<f64>() < appeal) {
                continue;
            }
            clicks += 1;
            let mut t = 0.0;
            let mut step = |kind: FeedbackKind, i: usize, value: f64, rng: &mut ChaCha8Rng| {
                t += delays.get(i).map_or(0.0, |d| d.sample(rng));
                Planned { item_id: item.clone(), position: *position, kind, value, delay_ms: t as i64 }
            };
            feedback.push(step(FeedbackKind::Click, 0, 0.0, &mut self.rng));
            if self.rng.random::<f64>() >= self.spec.p_cart {
                continue;
            }
            feedback.push(step(FeedbackKind::AddToCart, 1, 0.0, &mut self.rng));
            if self.rng.random::<f64>() >= self.spec.p_purchase {
                continue;
            }
            let value: f64 = price
                .as_ref()
                .map_or(50.0, |d: &LogNormal<f64>| (d.sample(&mut self.rng) * 100.0).round() / 100.0);
            feedback.push(step(FeedbackKind::Purchase, 2, value, &mut self.rng));
            if self.rng.random::<f64>() < self.spec.p_return {
                feedback.push(step(FeedbackKind::Return, 3, value, &mut self.rng));
            }
        }
        Reaction { feedback, clicks, expected_clicks, oracle_clicks, random_clicks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn priors() -> Priors {
        let mut campaigns = BTreeMap::new();
        campaigns.insert(
            "all".to_string(),
            CampaignPriors { alpha: vec![10.0, 40.0, 20.0], beta: vec![9990.0, 9960.0, 9980.0] },
        );
        Priors { source: "test".into(), sha256: String::new(), campaigns }
    }

    fn spec() -> ShopSpec {
        ShopSpec { traffic: vec![("all".into(), 1.0)], slate_size: 2, ..ShopSpec::default() }
    }

    #[test]
    fn the_oracle_slate_puts_the_most_appealing_items_first() {
        let shop = Shop::new(&priors(), spec()).expect("shop");
        let a = shop.appeal(0, 0).to_vec();
        let (oracle, random) = shop.benchmarks(0, 2, 0);
        let mut s = a.clone();
        s.sort_by(|x, y| y.total_cmp(x));
        assert!((oracle - (s[0] + 0.85 * s[1])).abs() < 1e-12);
        assert!((random - 1.85 * a.iter().sum::<f64>() / 3.0).abs() < 1e-12);
    }

    #[test]
    fn click_rates_follow_appeal_times_examination() {
        // Closed form: clicks per slate = Σ exam(p) · appeal(item at p).
        let mut shop = Shop::new(&priors(), spec()).expect("shop");
        let slate = vec![("all-001".to_string(), 1), ("all-000".to_string(), 2)];
        let n = 200_000;
        let clicks: u64 = (0..n).map(|_| u64::from(shop.react(0, &slate, 0).clicks)).sum();
        let a = shop.appeal(0, 0);
        let want = a[1] + 0.85 * a[0];
        let got = clicks as f64 / n as f64;
        let se = (want / n as f64).sqrt();
        assert!((got - want).abs() < 5.0 * se, "clicks per slate {got} vs {want}");
    }

    #[test]
    fn the_trend_shift_permutes_the_appeals() {
        let s = ShopSpec { shift_at_ms: Some(1_000), ..spec() };
        let shop = Shop::new(&priors(), s).expect("shop");
        let (mut before, mut after) = (shop.appeal(0, 999).to_vec(), shop.appeal(0, 1_000).to_vec());
        before.sort_by(f64::total_cmp);
        after.sort_by(f64::total_cmp);
        assert_eq!(before, after);
    }
}
