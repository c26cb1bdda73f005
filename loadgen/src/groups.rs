//! Which groups the virtual users form, kept pure (no I/O, seeded) so the
//! layout can be unit-tested and rebuilt identically for `--reuse`.
//!
//! Groups start at evenly spaced users; group `g` is its creator and the
//! next `size - 1` users on the ring. Sizes are skewed small: `size - 3`
//! follows a Zipf law with `--group-size-exponent`, capped at
//! `--group-max-size` (default: the server's group limit). Each group also
//! reaches at least to where the next one starts, so when groups start at
//! most a group limit apart every user is in one and can send to it.
//!
//! The server only lets a creator add friends, so every member needs a
//! friendship with its group's creator; [`extra_friendships`] lists the
//! ones the 1-1 friend graph lacks. They carry no 1-1 sends.

use std::collections::HashSet;

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::sampling::Zipf;

/// Smallest group: a group of two is a 1-1 conversation.
pub const MIN_GROUP_SIZE: usize = 3;
/// Seed offset for group sizes, independent of the send schedule.
const SIZE_SEED: u64 = 0x6a0b_0004;

/// One group: its creator and everyone else in it (by user index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// The user who creates it (and is its first admin).
    pub creator: usize,
    /// The other members, in ring order after the creator.
    pub members: Vec<usize>,
}

impl GroupSpec {
    /// Everyone in the group, creator first.
    pub fn everyone(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.creator).chain(self.members.iter().copied())
    }

    /// Members including the creator.
    pub fn size(&self) -> usize {
        self.members.len() + 1
    }
}

/// The groups of `users` virtual users: `count` groups with sizes drawn
/// from `seed`. Returns no groups when fewer than three users exist.
pub fn group_layout(
    users: usize,
    count: usize,
    max_size: usize,
    exponent: f64,
    seed: u64,
) -> Vec<GroupSpec> {
    let max_size = max_size.min(users);
    if count == 0 || max_size < MIN_GROUP_SIZE {
        return Vec::new();
    }
    let count = count.min(users);
    let sizes = Zipf::new(max_size - MIN_GROUP_SIZE + 1, exponent);
    let mut rng = StdRng::seed_from_u64(seed ^ SIZE_SEED);
    let start = |g: usize| g * users / count;
    (0..count)
        .map(|g| {
            let creator = start(g);
            let gap = if g + 1 < count {
                start(g + 1) - creator
            } else {
                users - creator
            };
            let size = (MIN_GROUP_SIZE + sizes.sample(&mut rng))
                .max(gap)
                .min(max_size);
            GroupSpec {
                creator,
                members: (1..size).map(|j| (creator + j) % users).collect(),
            }
        })
        .collect()
}

/// Friendships every group needs (creator with member) that `base` does
/// not already have, each once as `(creator, member)`, in group order.
pub fn extra_friendships(base: &[(usize, usize)], groups: &[GroupSpec]) -> Vec<(usize, usize)> {
    let key = |a: usize, b: usize| (a.min(b), a.max(b));
    let mut known: HashSet<(usize, usize)> = base.iter().map(|&(a, b)| key(a, b)).collect();
    let mut extra = Vec::new();
    for group in groups {
        for &member in &group.members {
            if known.insert(key(group.creator, member)) {
                extra.push((group.creator, member));
            }
        }
    }
    extra
}

/// Per user: the groups it is in, by index into `groups`.
pub fn memberships(users: usize, groups: &[GroupSpec]) -> Vec<Vec<usize>> {
    let mut of = vec![Vec::new(); users];
    for (g, group) in groups.iter().enumerate() {
        for member in group.everyone() {
            of[member].push(g);
        }
    }
    of
}

/// Others a group send reaches, on average over senders weighted by
/// `weight` (by user index): each sender picks one of its groups
/// uniformly. Also returns the weight of senders in no group (their group
/// sends go to a 1-1 conversation instead).
pub fn mean_recipients(groups: &[GroupSpec], weight: &[f64]) -> (f64, f64) {
    let of = memberships(weight.len(), groups);
    let (mut others, mut in_groups, mut outside) = (0.0, 0.0, 0.0);
    for (user, mine) in of.iter().enumerate() {
        if mine.is_empty() {
            outside += weight[user];
            continue;
        }
        let mean = mine
            .iter()
            .map(|&g| groups[g].members.len() as f64)
            .sum::<f64>()
            / mine.len() as f64;
        others += weight[user] * mean;
        in_groups += weight[user];
    }
    let mean = if in_groups > 0.0 {
        others / in_groups
    } else {
        0.0
    };
    (mean, outside)
}

/// Mean size of a group drawn from the size law before the gap and user
/// caps (for the plan printed at start).
pub fn mean_size(max_size: usize, exponent: f64) -> f64 {
    if max_size < MIN_GROUP_SIZE {
        return 0.0;
    }
    let sizes = max_size - MIN_GROUP_SIZE + 1;
    let law = Zipf::new(sizes, exponent);
    (0..sizes)
        .map(|k| law.probability(k) * (MIN_GROUP_SIZE + k) as f64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::friend_graph;

    #[test]
    fn every_user_is_in_a_group_when_groups_are_close_enough() {
        for (users, count, max) in [(20, 7, 250), (1_000, 350, 250), (10, 3, 5), (9, 9, 3)] {
            let groups = group_layout(users, count, max, 2.0, 7);
            assert_eq!(groups.len(), count);
            let of = memberships(users, &groups);
            assert!(
                of.iter().all(|g| !g.is_empty()),
                "{users} users, {count} groups"
            );
            for group in &groups {
                assert!((MIN_GROUP_SIZE..=max.min(users)).contains(&group.size()));
                let mut seen = HashSet::new();
                assert!(group.everyone().all(|m| m < users && seen.insert(m)));
            }
        }
        // Too few groups for their size limit: some users are left out.
        let groups = group_layout(100, 2, 10, 2.0, 7);
        assert!(memberships(100, &groups).iter().any(|g| g.is_empty()));
        assert!(group_layout(2, 5, 250, 2.0, 7).is_empty());
        assert!(group_layout(50, 0, 250, 2.0, 7).is_empty());
    }

    #[test]
    fn sizes_are_skewed_small_up_to_the_limit() {
        // Many groups far apart in users, so the gap rule does not lift
        // the sizes: what is left is the size law.
        let groups = group_layout(100_000, 2_000, 250, 2.0, 3);
        let sizes: Vec<usize> = groups.iter().map(GroupSpec::size).collect();
        let gap = 100_000 / 2_000;
        let small = sizes.iter().filter(|&&s| s == gap).count();
        assert!(small > sizes.len() / 2, "most groups stay at the gap size");
        let groups = group_layout(100_000, 100_000 / 3, 250, 2.0, 3);
        let sizes: Vec<usize> = groups.iter().map(GroupSpec::size).collect();
        let threes = sizes.iter().filter(|&&s| s == 3).count() as f64;
        let big = sizes.iter().filter(|&&s| s >= 50).count();
        let largest = *sizes.iter().max().unwrap();
        // Zipf(2) over sizes 3..=250: P(3) = 1 / zeta-ish 1.64 = 61%.
        assert!(
            (0.55..0.67).contains(&(threes / sizes.len() as f64)),
            "{threes}"
        );
        assert!(big > 0 && big < sizes.len() / 20, "{big} groups of 50+");
        assert!(largest <= 250 && largest > 100, "{largest}");
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        let want = mean_size(250, 2.0);
        assert!((mean - want).abs() < 0.3, "{mean} vs {want}");
        // Deterministic for a seed.
        assert_eq!(
            group_layout(500, 100, 250, 2.0, 9),
            group_layout(500, 100, 250, 2.0, 9)
        );
    }

    #[test]
    fn mean_recipients_weighs_each_senders_groups() {
        // Users 0..=3 in a group of 4; users 2..=4 in a group of 3; user 5
        // in none.
        let groups = [
            GroupSpec {
                creator: 0,
                members: vec![1, 2, 3],
            },
            GroupSpec {
                creator: 2,
                members: vec![3, 4],
            },
        ];
        let uniform = [1.0; 6];
        let (mean, outside) = mean_recipients(&groups, &uniform);
        // 0, 1: 3 others; 2, 3: (3 + 2) / 2; 4: 2 -> 13 / 5.
        assert!((mean - 13.0 / 5.0).abs() < 1e-9, "{mean}");
        assert_eq!(outside, 1.0);
        let only_four = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        assert_eq!(mean_recipients(&groups, &only_four), (2.0, 0.0));
    }

    #[test]
    fn extra_friendships_make_every_member_a_friend_of_the_creator() {
        let base = friend_graph(60, 5);
        let groups = group_layout(60, 20, 30, 1.2, 5);
        let extra = extra_friendships(&base, &groups);
        let key = |a: usize, b: usize| (a.min(b), a.max(b));
        let base_set: HashSet<_> = base.iter().map(|&(a, b)| key(a, b)).collect();
        let mut all = base_set.clone();
        for &(a, b) in &extra {
            assert!(!base_set.contains(&key(a, b)), "{a}-{b} already friends");
            assert!(all.insert(key(a, b)), "{a}-{b} twice");
        }
        for group in &groups {
            for &m in &group.members {
                assert!(all.contains(&key(group.creator, m)));
            }
        }
        assert!(!extra.is_empty());
    }
}
