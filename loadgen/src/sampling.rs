//! The random parts of the workload, each driven by a seeded generator so a
//! run can be repeated exactly: the Poisson send schedule, the Zipf choice
//! of who sends, and message text lengths.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Send instants of a Poisson process: exponential gaps at a fixed mean
/// rate, as offsets from the start of the run. Open loop: the schedule
/// never looks at how earlier sends went.
pub struct PoissonSchedule {
    rng: StdRng,
    rate: f64,
    next_s: f64,
}

impl PoissonSchedule {
    /// A schedule of `rate` events per second from `seed`.
    pub fn new(rate: f64, seed: u64) -> Self {
        PoissonSchedule {
            rng: StdRng::seed_from_u64(seed),
            rate,
            next_s: 0.0,
        }
    }

    /// The next send's offset from the start; `None` when the rate is zero
    /// or the offset is past what a `Duration` holds (a rate so small the
    /// next send would come after hundreds of billions of years).
    pub fn next_offset(&mut self) -> Option<Duration> {
        if self.rate <= 0.0 || !self.rate.is_finite() {
            return None;
        }
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u: f64 = self.rng.random();
        self.next_s += -(1.0 - u).ln() / self.rate;
        Duration::try_from_secs_f64(self.next_s).ok()
    }
}

/// Picks index `i` of `0..n` with probability proportional to
/// `1 / (i + 1)^s`: a few users send most messages, as in real chat
/// services. `s = 0` is uniform.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// A sampler over `n` (at least one) items with exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n.max(1))
            .map(|i| {
                total += 1.0 / ((i + 1) as f64).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    /// The probability of index `i`.
    pub fn probability(&self, i: usize) -> f64 {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let below = if i == 0 { 0.0 } else { self.cumulative[i - 1] };
        (self.cumulative[i] - below) / total
    }

    /// One index.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len() - 1)
    }
}

/// Seed offset of [`sender_order`], independent of the other streams.
const RANK_SEED: u64 = 0x5e4d_0005;

/// Which user holds each Zipf rank: a seeded shuffle, so the busiest
/// senders are not neighbours in the friend graph or the groups (they
/// would befriend each other and share groups more than anyone else).
pub fn sender_order(users: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom as _;
    let mut order: Vec<usize> = (0..users).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ RANK_SEED));
    order
}

/// Which users (by index) are the `count` least active in `order` (a
/// [`sender_order`]): true for the last ranks.
pub fn least_active(order: &[usize], count: usize) -> Vec<bool> {
    let mut out = vec![false; order.len()];
    for &user in order.iter().rev().take(count) {
        out[user] = true;
    }
    out
}

/// How long message texts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TextDist {
    /// Every text has exactly `--text-bytes` bytes.
    Fixed,
    /// Log-normal with mean `--text-bytes` (sigma 0.8): mostly short texts
    /// and a long tail.
    Lognormal,
}

/// Spread of the log-normal text lengths (sigma of the underlying normal).
const LOGNORMAL_SIGMA: f64 = 0.8;

/// Samples text lengths in bytes.
pub struct TextLen {
    dist: TextDist,
    mean: usize,
    min: usize,
    max: usize,
}

impl TextLen {
    /// Lengths with the given distribution and mean, clamped to
    /// `min..=max`.
    pub fn new(dist: TextDist, mean: usize, min: usize, max: usize) -> Self {
        TextLen {
            dist,
            mean,
            min,
            max: max.max(min),
        }
    }

    /// One length.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let len = match self.dist {
            TextDist::Fixed => self.mean,
            TextDist::Lognormal => {
                // Box-Muller: one standard normal from two uniforms.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                let mu = (self.mean.max(1) as f64).ln() - LOGNORMAL_SIGMA * LOGNORMAL_SIGMA / 2.0;
                (mu + LOGNORMAL_SIGMA * z).exp().round() as usize
            }
        };
        len.clamp(self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vanishing_rate_ends_the_schedule_instead_of_panicking() {
        for rate in [1e-20, 1e-300, f64::MIN_POSITIVE] {
            let mut schedule = PoissonSchedule::new(rate, 1);
            // The first offset is far beyond any run (or beyond a Duration).
            assert!(
                schedule
                    .next_offset()
                    .is_none_or(|d| d > Duration::from_secs(1 << 40)),
                "{rate}"
            );
        }
    }

    #[test]
    fn poisson_mean_rate_for_a_fixed_seed() {
        let rate = 500.0;
        let mut schedule = PoissonSchedule::new(rate, 42);
        let mut count = 0u32;
        let mut last = Duration::ZERO;
        while let Some(t) = schedule.next_offset() {
            assert!(t >= last, "offsets never go back");
            last = t;
            if t >= Duration::from_secs(20) {
                break;
            }
            count += 1;
        }
        // 10,000 expected; a Poisson count has sd 100, so 3% is over 3 sd.
        let measured = f64::from(count) / 20.0;
        assert!((measured - rate).abs() / rate < 0.03, "{measured}/s");
        // Same seed, same schedule.
        let a: Vec<_> = {
            let mut s = PoissonSchedule::new(10.0, 7);
            (0..5).filter_map(|_| s.next_offset()).collect()
        };
        let b: Vec<_> = {
            let mut s = PoissonSchedule::new(10.0, 7);
            (0..5).filter_map(|_| s.next_offset()).collect()
        };
        assert_eq!(a, b);
        assert_eq!(PoissonSchedule::new(0.0, 1).next_offset(), None);
    }

    #[test]
    fn zipf_favours_low_ranks_in_the_right_proportion() {
        let n = 10;
        let zipf = Zipf::new(n, 1.0);
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = vec![0u32; n];
        let draws = 100_000;
        for _ in 0..draws {
            counts[zipf.sample(&mut rng)] += 1;
        }
        // Harmonic number H(10) = 2.928968...; P(0) = 1/H, P(1) = 1/(2H).
        let h: f64 = (1..=n).map(|i| 1.0 / i as f64).sum();
        let p0 = f64::from(counts[0]) / f64::from(draws);
        let p9 = f64::from(counts[9]) / f64::from(draws);
        assert!((p0 - 1.0 / h).abs() < 0.01, "p0 = {p0}");
        assert!((p9 - 1.0 / (10.0 * h)).abs() < 0.005, "p9 = {p9}");
        assert!(counts.windows(2).all(|w| w[0] > w[1]), "{counts:?}");
        // Exponent 0 is uniform.
        let uniform = Zipf::new(4, 0.0);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[uniform.sample(&mut rng)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
        // One item: always it.
        assert_eq!(Zipf::new(1, 1.0).sample(&mut rng), 0);
    }

    #[test]
    fn text_lengths() {
        let mut rng = StdRng::seed_from_u64(5);
        let fixed = TextLen::new(TextDist::Fixed, 128, 30, 16_384);
        assert_eq!(fixed.sample(&mut rng), 128);
        let small = TextLen::new(TextDist::Fixed, 10, 30, 16_384);
        assert_eq!(small.sample(&mut rng), 30, "never below the header");
        let lognormal = TextLen::new(TextDist::Lognormal, 128, 1, 1 << 20);
        let n = 50_000;
        let sum: usize = (0..n).map(|_| lognormal.sample(&mut rng)).sum();
        let mean = sum as f64 / n as f64;
        assert!((mean - 128.0).abs() < 5.0, "mean {mean}");
    }

    #[test]
    fn the_least_active_are_the_last_ranks() {
        let order = sender_order(10, 3);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "a permutation");
        let background = least_active(&order, 3);
        assert_eq!(background.iter().filter(|&&b| b).count(), 3);
        assert!(order[7..].iter().all(|&u| background[u]));
        assert!(least_active(&order, 0).iter().all(|&b| !b));
        assert!(least_active(&order, 10).iter().all(|&b| b));
    }
}
