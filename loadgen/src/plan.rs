//! Workload math, kept pure so it can be unit-tested: the profile's
//! full-scale rates, how a shard of the population maps to this process,
//! the rate this process offers, and the friend graph its users form.
//!
//! Nothing here does I/O or reads a clock; the driver turns a [`Plan`] into
//! connections and sends.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// Seconds in a day, for "sends per day" to "sends per second".
const SECONDS_PER_DAY: f64 = 86_400.0;

/// A named workload: how many users the service has and how much they send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Name shown in reports.
    pub name: &'static str,
    /// Registered users of the full-scale service.
    pub population: u64,
    /// Message sends per day across the whole service.
    pub sends_per_day: f64,
}

impl Profile {
    /// The Messenger-class target from DESIGN.md: 300 million users and 10
    /// billion sends a day.
    pub const MESSENGER: Profile = Profile {
        name: "messenger",
        population: 300_000_000,
        sends_per_day: 10_000_000_000.0,
    };

    /// Average sends per second at full scale.
    pub fn average_rate(&self) -> f64 {
        self.sends_per_day / SECONDS_PER_DAY
    }

    /// Sends per second at the daily peak.
    pub fn peak_rate(&self, peak_factor: f64) -> f64 {
        self.average_rate() * peak_factor
    }

    /// Sends per user per day, on average.
    pub fn sends_per_user_per_day(&self) -> f64 {
        self.sends_per_day / self.population as f64
    }
}

/// One of `count` equal slices of the population (`--shard index/count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which slice, from 0.
    pub index: u64,
    /// How many slices.
    pub count: u64,
}

impl Shard {
    /// The whole population in one slice.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// The population indices of this slice. Slices of one split are
    /// contiguous, disjoint and together cover `0..population`.
    pub fn range(&self, population: u64) -> Range<u64> {
        let bound =
            |i: u64| (u128::from(population) * u128::from(i) / u128::from(self.count)) as u64;
        bound(self.index)..bound(self.index + 1)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let (index, count) = s
            .split_once('/')
            .ok_or_else(|| format!("shard {s:?} must look like i/n, e.g. 0/4"))?;
        let index: u64 = index
            .trim()
            .parse()
            .map_err(|_| format!("shard index {index:?} is not a number"))?;
        let count: u64 = count
            .trim()
            .parse()
            .map_err(|_| format!("shard count {count:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!(
                "shard {index}/{count}: the index must be below the count (0/1 .. {}/{count})",
                count.saturating_sub(1)
            ));
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What this process will do, derived from the flags before anything
/// connects.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The workload profile.
    pub profile: Profile,
    /// Peak over average.
    pub peak_factor: f64,
    /// This process's slice of the population.
    pub shard: Shard,
    /// Population indices of the slice.
    pub shard_range: Range<u64>,
    /// Virtual users this process runs: the first `users` indices of the
    /// slice, each with its own connection.
    pub users: u64,
    /// Sends per second this process offers.
    pub offered_rate: f64,
    /// True when `--rate` replaced the profile's per-user rate.
    pub rate_overridden: bool,
}

impl Plan {
    /// The seed of this shard's schedule (arrivals, senders, churn):
    /// `--seed` in shard 0, mixed with the index in the others, so n shards
    /// started together offer n independent Poisson streams rather than
    /// one stream n times over (n sends at each instant).
    pub fn schedule_seed(&self, seed: u64) -> u64 {
        seed ^ self.shard.index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// Derives the plan. Without an explicit rate, each virtual user sends
    /// at the profile's per-user peak rate, so running every shard with all
    /// of its users offers exactly the full-scale peak rate.
    pub fn new(
        profile: Profile,
        peak_factor: f64,
        shard: Shard,
        users: u64,
        rate: Option<f64>,
    ) -> Result<Plan, String> {
        if !(peak_factor.is_finite() && peak_factor >= 1.0) {
            return Err(format!("--peak-factor {peak_factor} must be at least 1"));
        }
        let shard_range = shard.range(profile.population);
        let shard_users = shard_range.end - shard_range.start;
        if users == 0 {
            return Err("--users must be at least 1".into());
        }
        if users > shard_users {
            return Err(format!(
                "--users {users} exceeds shard {shard}'s {shard_users} users"
            ));
        }
        if let Some(rate) = rate
            && !(rate.is_finite() && rate >= 0.0)
        {
            return Err(format!("--rate {rate} must be a non-negative number"));
        }
        let per_user = profile.peak_rate(peak_factor) / profile.population as f64;
        Ok(Plan {
            profile,
            peak_factor,
            shard,
            shard_range,
            users,
            offered_rate: rate.unwrap_or(per_user * users as f64),
            rate_overridden: rate.is_some(),
        })
    }

    /// Population index of virtual user `k` (0-based within this process).
    pub fn population_index(&self, k: usize) -> u64 {
        self.shard_range.start + k as u64
    }

    /// The human-readable plan printed at start.
    pub fn describe(&self) -> String {
        let p = &self.profile;
        let shard_users = self.shard_range.end - self.shard_range.start;
        let mut out = format!(
            "plan: profile {} = {} users, {:.1} sends/user/day\n\
             plan: full scale {:.0} sends/s average, {:.0} sends/s at peak (x{})\n\
             plan: shard {} = users [{}, {}) = {:.4}% of the population\n\
             plan: this process runs {} of them ({:.6}% of the population), one connection each\n",
            p.name,
            p.population,
            p.sends_per_user_per_day(),
            p.average_rate(),
            p.peak_rate(self.peak_factor),
            self.peak_factor,
            self.shard,
            self.shard_range.start,
            self.shard_range.end,
            100.0 * shard_users as f64 / p.population as f64,
            self.users,
            100.0 * self.users as f64 / p.population as f64,
        );
        if self.shard.count > 1 {
            out.push_str(&format!(
                "plan: shard {}'s share of the full-scale peak is {:.0} sends/s: \
                 with --rate {:.0} in each, {} processes together offer the full rate\n",
                self.shard,
                self.shard_peak_rate(),
                self.shard_peak_rate(),
                self.shard.count,
            ));
        }
        if self.rate_overridden {
            out.push_str(&format!(
                "plan: offered rate {:.1} sends/s (set by --rate; the profile's share would be {:.3})\n",
                self.offered_rate,
                self.profile_rate()
            ));
        } else {
            out.push_str(&format!(
                "plan: offered rate {:.3} sends/s (the profile's peak rate for these users)\n",
                self.offered_rate
            ));
        }
        out
    }

    /// The shard's share of the full-scale peak rate: what this process
    /// offers with `--rate` at that figure, its users standing for the
    /// whole shard.
    pub fn shard_peak_rate(&self) -> f64 {
        let shard_users = self.shard_range.end - self.shard_range.start;
        self.profile.peak_rate(self.peak_factor) * shard_users as f64
            / self.profile.population as f64
    }

    /// The rate the profile alone would give these users.
    pub fn profile_rate(&self) -> f64 {
        self.profile.peak_rate(self.peak_factor) * self.users as f64
            / self.profile.population as f64
    }
}

/// Who is friends with whom among `users` virtual users: a ring lattice in
/// which every user has `degree` friends (capped at `users - 1`). User `k`
/// is friends with its `degree / 2` nearest neighbours on each side; an odd
/// degree adds the user opposite on the ring, which needs an even number of
/// users (with an odd number, every user gets `degree - 1` friends, since
/// no graph gives an odd number of users an odd degree each).
///
/// Returns each friendship once as `(a, b)` with `a` asking `b`.
pub fn friend_graph(users: usize, degree: usize) -> Vec<(usize, usize)> {
    if users < 2 {
        return Vec::new();
    }
    let degree = degree.min(users - 1);
    let half = degree / 2;
    let mut edges = Vec::with_capacity(users * degree / 2 + 1);
    // Offsets stay below users / 2 (2 * half < users), so the two
    // directions of one offset never name the same pair.
    for k in 0..users {
        for offset in 1..=half {
            edges.push((k, (k + offset) % users));
        }
    }
    if degree % 2 == 1 && users.is_multiple_of(2) {
        // The opposite user is further than `half`, so this adds new pairs.
        let opposite = users / 2;
        for k in 0..opposite {
            edges.push((k, k + opposite));
        }
    }
    edges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shard_draws_its_own_schedule() {
        let plan = |index| {
            Plan::new(
                Profile::MESSENGER,
                2.0,
                Shard { index, count: 3 },
                100,
                Some(10.0),
            )
            .unwrap()
        };
        assert_eq!(plan(0).schedule_seed(7), 7, "shard 0 keeps --seed");
        let seeds: std::collections::HashSet<u64> =
            (0..3).map(|i| plan(i).schedule_seed(7)).collect();
        assert_eq!(seeds.len(), 3);
    }

    #[test]
    fn messenger_rates() {
        let p = Profile::MESSENGER;
        assert!((p.average_rate() - 115_740.74).abs() < 0.01);
        assert!((p.peak_rate(2.0) - 231_481.48).abs() < 0.01);
        assert!((p.sends_per_user_per_day() - 33.33).abs() < 0.01);
    }

    #[test]
    fn shards_cover_every_user_exactly_once() {
        for (population, count) in [(300_000_000u64, 7u64), (10, 3), (5, 5), (7, 1), (3, 4)] {
            let mut next = 0;
            for index in 0..count {
                let r = Shard { index, count }.range(population);
                assert_eq!(r.start, next, "shard {index}/{count} of {population}");
                assert!(r.end >= r.start);
                next = r.end;
            }
            assert_eq!(next, population, "{count} shards of {population}");
        }
        // Exhaustive on a small population: each user in exactly one shard.
        let population = 97;
        let mut seen = vec![0u32; population as usize];
        for index in 0..10 {
            for u in (Shard { index, count: 10 }).range(population) {
                seen[u as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn full_shards_offer_the_peak_rate() {
        // A population small enough to "run" every user of every shard.
        let profile = Profile {
            name: "tiny",
            population: 1_000,
            sends_per_day: 86_400.0 * 50.0,
        };
        let count = 3;
        let total: f64 = (0..count)
            .map(|index| {
                let shard = Shard { index, count };
                let r = shard.range(profile.population);
                Plan::new(profile, 2.0, shard, r.end - r.start, None)
                    .unwrap()
                    .offered_rate
            })
            .sum();
        assert!((total - 100.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn rate_from_users_or_override() {
        let plan = Plan::new(Profile::MESSENGER, 2.0, Shard::ALL, 3_000, None).unwrap();
        // 3,000 of 300 million users at 231,481/s peak.
        assert!((plan.offered_rate - 2.314_814).abs() < 1e-5);
        assert!(!plan.rate_overridden);
        let plan = Plan::new(Profile::MESSENGER, 2.0, Shard::ALL, 20, Some(50.0)).unwrap();
        assert_eq!(plan.offered_rate, 50.0);
        assert!(plan.describe().contains("set by --rate"));
        let shard: Shard = "3/4".parse().unwrap();
        let plan = Plan::new(Profile::MESSENGER, 2.0, shard, 10, None).unwrap();
        assert_eq!(plan.population_index(0), 225_000_000);
        assert_eq!(plan.population_index(9), 225_000_009);
    }

    #[test]
    fn shards_name_their_share_of_the_full_scale_peak() {
        // Four shards of 300 million users at 231,481/s peak: 57,870/s each,
        // and together the full peak.
        let total: f64 = (0..4)
            .map(|index| {
                let plan = Plan::new(Profile::MESSENGER, 2.0, Shard { index, count: 4 }, 10, None)
                    .unwrap();
                assert!((plan.shard_peak_rate() - 57_870.37).abs() < 0.01);
                assert!(
                    plan.describe()
                        .contains("with --rate 57870 in each, 4 processes"),
                    "{}",
                    plan.describe()
                );
                plan.shard_peak_rate()
            })
            .sum();
        assert!((total - Profile::MESSENGER.peak_rate(2.0)).abs() < 1e-6);
    }

    #[test]
    fn bad_plans_say_why() {
        let too_many = Plan::new(
            Profile::MESSENGER,
            2.0,
            Shard {
                index: 0,
                count: 300_000_000,
            },
            2,
            None,
        );
        assert!(too_many.unwrap_err().contains("exceeds"));
        assert!(Plan::new(Profile::MESSENGER, 0.5, Shard::ALL, 2, None).is_err());
        assert!(Plan::new(Profile::MESSENGER, 2.0, Shard::ALL, 2, Some(-1.0)).is_err());
        for bad in ["", "1", "1/1", "a/2", "0/0", "2/b"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad:?}");
        }
        assert_eq!("1/3".parse::<Shard>().unwrap().to_string(), "1/3");
    }

    #[test]
    fn friend_graph_degrees() {
        for (users, degree) in [
            (20, 5),
            (20, 4),
            (7, 3),
            (2, 5),
            (6, 5),
            (4, 2),
            (5, 4),
            (100, 9),
        ] {
            let edges = friend_graph(users, degree);
            let mut deg = vec![0usize; users];
            let mut set = std::collections::HashSet::new();
            for &(a, b) in &edges {
                assert_ne!(a, b);
                assert!(set.insert((a.min(b), a.max(b))), "duplicate edge {a}-{b}");
                deg[a] += 1;
                deg[b] += 1;
            }
            let want = degree.min(users - 1);
            let exact = want % 2 == 0 || users % 2 == 0;
            for (k, d) in deg.iter().enumerate() {
                if exact {
                    assert_eq!(*d, want, "user {k} of {users}, degree {degree}");
                } else {
                    assert!(*d + 1 >= want && *d <= want, "user {k}: {d} vs {want}");
                }
            }
        }
        assert!(friend_graph(1, 5).is_empty());
    }
}
