//! Which messages the app has had, so a redelivery (the server resends
//! what it did not see acknowledged, e.g. after a reconnect) is not shown
//! twice, while a message that arrives after higher ones of its
//! conversation still is.
//!
//! Per conversation: the highest seq handed over, and a window of the 256
//! seqs below it, one bit each, set for those handed over too. A seq above
//! the highest is new (the window slides up); one within the window is new
//! if its bit is clear; one below the window is taken as a repeat. The
//! server delivers a conversation in seq order, except in a rare case: a
//! message whose batch was reported failed (Postgres: its commit outcome
//! unknown) is found stored by the sender's retry and delivered again to
//! the members still owed it, after later messages of the conversation.
//! A high-water mark alone took it for a redelivery, dropped it and acked
//! over it: the user never saw it. The window is not a contiguous floor:
//! gaps are normal (the user's own messages are not delivered back), so a
//! clear bit says "not handed over", not "missing". A message more than
//! 256 seqs below the highest is still dropped as a repeat.
//!
//! Bounded: the server names the conversations, and a client must not grow
//! without limit on what a server sends it. Beyond [`MAX_CONVERSATIONS`]
//! the half of the conversations that had a delivery least recently is
//! forgotten. A redelivery only follows a delivery whose ack was lost, a
//! moment earlier, so what is forgotten (thousands of conversations ago)
//! is never asked about again in practice.

use std::collections::HashMap;

/// Conversations remembered at most. Each takes 56 bytes (its id, the
/// highest seq, the 256-bit window and a recency tick), plus the hash
/// table's slack: at most ~1.9 MB.
pub(crate) const MAX_CONVERSATIONS: usize = 16_384;

/// Seqs below the highest that are told apart.
const WINDOW: u64 = 256;

#[derive(Debug, Default)]
pub(crate) struct Delivered {
    /// Conversation -> what was handed over of it.
    seqs: HashMap<u64, Marks>,
    /// Counts deliveries: recency without a clock.
    tick: u64,
}

/// What was handed over of one conversation.
#[derive(Debug, Default, Clone, Copy)]
struct Marks {
    /// The highest seq handed over (0: none).
    high: u64,
    /// Bit `i` set: seq `high - 1 - i` was handed over too.
    window: Window,
    /// The tick of the conversation's last delivery.
    touched: u64,
}

impl Marks {
    fn is_new(&self, seq: u64) -> bool {
        if seq > self.high {
            return true;
        }
        let below = self.high - seq;
        below != 0 && below <= WINDOW && !self.window.get(below - 1)
    }

    /// Records `seq` as handed over; true if it was not before.
    fn record(&mut self, seq: u64) -> bool {
        if !self.is_new(seq) {
            return false;
        }
        if seq > self.high {
            // The old highest becomes bit `up - 1` (seq 0 included: no
            // message has it, and it stays a repeat as it always was).
            let up = seq - self.high;
            self.window.shift(up);
            if up <= WINDOW {
                self.window.set(up - 1);
            }
            self.high = seq;
        } else {
            self.window.set(self.high - seq - 1);
        }
        true
    }
}

/// 256 bits; bit `i` is bit `i % 64` of word `i / 64`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Window([u64; 4]);

impl Window {
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64) {
        self.0[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Moves every bit `n` places up (bit `i` becomes bit `i + n`),
    /// dropping those that pass the top.
    fn shift(&mut self, n: u64) {
        if n >= WINDOW {
            self.0 = [0; 4];
            return;
        }
        let (words, bits) = ((n / 64) as usize, (n % 64) as u32);
        let mut shifted = [0; 4];
        for (i, word) in shifted.iter_mut().enumerate().skip(words) {
            let from = i - words;
            *word = self.0[from] << bits;
            if bits > 0 && from > 0 {
                *word |= self.0[from - 1] >> (64 - bits);
            }
        }
        self.0 = shifted;
    }
}

impl Delivered {
    /// True the first time (conversation, seq) is seen, and recorded: a
    /// seq above the highest one, or within the 256 below it and not seen
    /// yet (see the module docs).
    pub(crate) fn first(&mut self, conversation_id: u64, seq: u64) -> bool {
        self.tick += 1;
        let marks = self.seqs.entry(conversation_id).or_default();
        marks.touched = self.tick;
        let first = marks.record(seq);
        if self.seqs.len() > MAX_CONVERSATIONS {
            forget_least_recent_half(&mut self.seqs, |marks| marks.touched);
        }
        first
    }

    /// Whether (conversation, seq) would be [`first`](Self::first), without
    /// recording it.
    pub(crate) fn is_new(&self, conversation_id: u64, seq: u64) -> bool {
        self.seqs
            .get(&conversation_id)
            .is_none_or(|marks| marks.is_new(seq))
    }

    /// The highest seq seen of the conversation, if it is remembered.
    pub(crate) fn last(&self, conversation_id: u64) -> Option<u64> {
        self.seqs.get(&conversation_id).map(|marks| marks.high)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seqs.len()
    }
}

/// Drops the entries whose tick (each entry's own, as `tick` reads it) is
/// older than the median: one O(n) pass per half a bound's worth of new
/// entries, for a map kept under that bound.
pub(crate) fn forget_least_recent_half<K, V>(map: &mut HashMap<K, V>, tick: impl Fn(&V) -> u64) {
    let mut ticks: Vec<u64> = map.values().map(&tick).collect();
    if ticks.is_empty() {
        return;
    }
    let middle = ticks.len() / 2;
    let (_, &mut cut, _) = ticks.select_nth_unstable(middle);
    map.retain(|_, value| tick(value) >= cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_seq_not_handed_over_is_new_per_conversation() {
        let mut d = Delivered::default();
        assert!(d.is_new(1, 1));
        assert!(d.first(1, 1));
        assert!(d.first(1, 2));
        assert!(!d.is_new(1, 2) && d.is_new(1, 3), "a look records nothing");
        assert!(!d.first(1, 2), "redelivery");
        assert!(!d.first(1, 1), "older, handed over");
        assert!(d.first(2, 1), "another conversation");
        assert!(d.first(1, 5), "gaps are fine");
        assert_eq!((d.last(1), d.last(2), d.last(3)), (Some(5), Some(1), None));
        assert!(!d.first(1, 0), "no message has seq 0");
    }

    #[test]
    fn in_order_each_seq_is_new_once() {
        let mut d = Delivered::default();
        for seq in 1..=600 {
            assert!(d.first(1, seq), "{seq}");
            assert!(!d.first(1, seq), "{seq} again");
        }
        for seq in 600 - WINDOW..=600 {
            assert!(!d.is_new(1, seq), "{seq} is remembered");
        }
        assert_eq!(d.last(1), Some(600));
    }

    #[test]
    fn a_lower_seq_within_the_window_is_new_once() {
        let mut d = Delivered::default();
        assert!(d.first(1, 10));
        assert!(d.first(1, 12));
        // Out of order: below the highest, never handed over.
        assert!(d.is_new(1, 11));
        assert!(d.first(1, 11), "arrived after a higher one");
        assert!(!d.first(1, 11), "a duplicate within the window");
        assert!(d.first(1, 3), "an older gap");
        assert!(!d.first(1, 3));
        assert!(!d.first(1, 10) && !d.first(1, 12), "handed over before");
        assert_eq!(d.last(1), Some(12), "the highest does not move down");
    }

    #[test]
    fn below_the_window_is_a_repeat() {
        let mut d = Delivered::default();
        assert!(d.first(1, 1_000));
        assert!(d.first(1, 1_000 - WINDOW), "the window's lowest seq");
        assert!(!d.first(1, 1_000 - WINDOW), "and only once");
        assert!(!d.is_new(1, 1_000 - WINDOW - 1), "below the window");
        assert!(!d.first(1, 1_000 - WINDOW - 1), "below the window");
        assert!(!d.first(1, 1));
        // The window follows the highest up.
        assert!(d.first(1, 1_001));
        assert!(!d.first(1, 1_000 - WINDOW), "fell out of the window");
        assert!(d.first(1, 1_001 - WINDOW));
    }

    #[test]
    fn a_shift_keeps_what_stays_within_the_window() {
        let mut d = Delivered::default();
        for seq in [5, 70, 130, 200] {
            assert!(d.first(1, seq));
        }
        // Up by 60: bits move across words.
        assert!(d.first(1, 260));
        for seq in [5, 70, 130, 200] {
            assert!(!d.first(1, seq), "{seq} stays handed over");
        }
        for seq in [6, 69, 71, 129, 131, 199, 201, 259] {
            assert!(d.is_new(1, seq), "{seq} was never handed over");
        }
        // Up by more than the window: everything below is forgotten, the
        // old highest included.
        assert!(d.first(1, 260 + WINDOW + 1));
        assert!(!d.is_new(1, 260), "below the window now");
        for seq in [261, 300, 260 + WINDOW] {
            assert!(d.first(1, seq), "{seq} within the new window");
        }
        // Up by exactly the window: the old highest is its lowest bit.
        let mut d = Delivered::default();
        assert!(d.first(2, 1));
        assert!(d.first(2, 1 + WINDOW));
        assert!(!d.first(2, 1), "the old highest, at the window's bottom");
        assert!(d.first(2, 2));
    }

    #[test]
    fn window_shifts_move_bits_across_words() {
        let mut w = Window::default();
        for i in [0, 1, 63, 64, 127, 200, 255] {
            w.set(i);
        }
        let mut up = w;
        up.shift(65);
        let set: Vec<u64> = (0..WINDOW).filter(|&i| up.get(i)).collect();
        assert_eq!(set, [65, 66, 128, 129, 192]);
        let mut none = w;
        none.shift(0);
        assert_eq!(none, w);
        none.shift(WINDOW);
        assert_eq!(none, Window::default());
    }

    #[test]
    fn stays_bounded_and_keeps_the_recent_conversations() {
        let mut d = Delivered::default();
        // A conversation that keeps getting messages among a flood of new
        // ones (what a hostile or broken server could send).
        for i in 0..(4 * MAX_CONVERSATIONS as u64) {
            assert!(d.first(1_000_000 + i, 1));
            assert!(d.first(7, i + 1), "the busy conversation's seq {}", i + 1);
            assert!(d.len() <= MAX_CONVERSATIONS);
        }
        assert!(
            !d.first(7, 4 * MAX_CONVERSATIONS as u64),
            "still deduplicated"
        );
        // The latest of the flood are remembered too.
        let latest = 1_000_000 + 4 * MAX_CONVERSATIONS as u64 - 1;
        assert!(!d.first(latest, 1));
        assert!(d.len() > MAX_CONVERSATIONS / 2 - 2, "{}", d.len());
    }
}
