//! What a run measures: one record per send, the counters and HdrHistograms
//! built from them, the once-a-second progress line, and the final
//! [`Report`] (a table for people, JSON for scripts).
//!
//! Every latency is counted from the send's *intended* time on the open
//! loop schedule, never from when the send actually left: if the server
//! (or the load generator) stalls, the stall shows up as latency instead of
//! silently lowering the offered rate (no coordinated omission).
//!
//! Only sends whose intended time falls in the measured window are counted;
//! warm-up sends run through the same code and are then ignored.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency the histograms hold, in microseconds (one hour); longer
/// ones are recorded as this.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant decimal digits the histograms keep.
const SIGNIFICANT_DIGITS: u8 = 3;

/// The process-wide time base: nanoseconds since one `Instant`, which fits
/// in a message text and is comparable between sender and receiver because
/// both live in this process.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The tokio instant `ns` after the epoch, to sleep until.
    pub fn instant(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + Duration::from_nanos(ns))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What happened to one send.
#[derive(Debug, Clone, Copy, Default)]
struct SendRecord {
    measured: bool,
    resolved: bool,
    acked: bool,
    /// Members it must reach: 1 for a 1-1 send, the group size less the
    /// sender for a group send.
    recipients: u32,
    /// Distinct recipients it reached.
    reached: u32,
    /// Where it went and who sent it: a copy anywhere else, at the sender
    /// or at a user who is not a member, is misrouted, not a delivery.
    conversation_id: u64,
    sender: u32,
    /// When it was meant to leave (ns on the run's clock).
    intended_ns: u64,
}

/// Sends of one sender in one conversation that wait for every other
/// member's delivered receipt (one member in a 1-1 conversation).
#[derive(Debug, Default)]
struct ReceiptWatch {
    /// Members whose receipts count (0 until the first ack says).
    recipients: u32,
    /// Highest delivered watermark each member reported, by user id.
    delivered: HashMap<u64, u64>,
    /// The seq every recipient has reported delivered (0 until all have
    /// reported), kept current so a receipt costs O(1) but for one full
    /// scan each time the floor rises.
    floor: u64,
    /// Members whose watermark is exactly `floor`.
    at_floor: usize,
    /// seq -> (intended ns, measured).
    pending: BTreeMap<u64, (u64, bool)>,
}

impl ReceiptWatch {
    fn set_recipients(&mut self, recipients: u32) {
        if self.recipients != recipients {
            self.recipients = recipients;
            self.refloor();
        }
    }

    fn refloor(&mut self) {
        if self.recipients == 0 || self.delivered.len() < self.recipients as usize {
            (self.floor, self.at_floor) = (0, 0);
            return;
        }
        let min = self.delivered.values().copied().min().unwrap_or(0);
        self.floor = min;
        self.at_floor = self.delivered.values().filter(|&&v| v == min).count();
    }

    /// Records `reporter`'s delivered watermark; true if the floor rose.
    fn report(&mut self, reporter: u64, seq: u64) -> bool {
        let before = self.floor;
        match self.delivered.entry(reporter) {
            Entry::Occupied(mut mark) => {
                if seq <= *mark.get() {
                    return false;
                }
                let was = std::mem::replace(mark.get_mut(), seq);
                if self.recipients > 0
                    && self.delivered.len() >= self.recipients as usize
                    && was == self.floor
                {
                    self.at_floor -= 1;
                    if self.at_floor == 0 {
                        self.refloor();
                    }
                }
            }
            Entry::Vacant(mark) => {
                mark.insert(seq);
                self.refloor();
            }
        }
        self.floor > before
    }
}

/// Counters of the measured window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sends attempted.
    pub sent: u64,
    /// The part of `sent` that went to groups.
    pub group_sends: u64,
    /// The part of `sent` that were photos (uploaded, then sent).
    pub photo_sends: u64,
    /// Photos recipients downloaded whole and found matching their SHA-256
    /// (each recipient fetches each photo it is delivered).
    pub photos_downloaded: u64,
    /// TypingUpdate events recipients' clients took (`--typing-fraction`),
    /// warm-up and drain included, as they carry no send number.
    pub typing_received: u64,
    /// The part of `sent` that were replies (`--reply-fraction`).
    pub reply_sends: u64,
    /// Reactions recipients sent to texts they were delivered
    /// (`--reaction-fraction`) that the server acknowledged, and the
    /// REACTION messages clients took; whole run, as typing.
    pub reactions_acked: u64,
    pub reactions_received: u64,
    /// Sends the server acknowledged as durable.
    pub acked: u64,
    /// Acks that arrived within the measured window, of any send (warm-up
    /// ones included): the throughput. A server that falls behind acks
    /// the rest in the drain, and those must not count as carried; and
    /// counting only the window's own sends would leave out those of its
    /// last ack latency, so a server that keeps up would score 1 - L/D.
    pub acked_in_window: u64,
    /// Sends that became delivered to every recipient within the window
    /// (warm-up ones included).
    pub delivered_in_window: u64,
    /// Arrivals at a recipient within the window (warm-up sends included).
    pub deliveries_in_window: u64,
    /// Sends that reached every recipient's app (at least once).
    pub delivered: u64,
    /// Acked sends that were also delivered to every recipient.
    pub acked_delivered: u64,
    /// Arrivals of a send at one recipient (a group send to five others
    /// makes five).
    pub deliveries: u64,
    /// Acked sends whose delivered receipts (from every recipient) came
    /// back to the sender.
    pub receipts: u64,
    /// Sends failed or unanswered (the rest of `sent`).
    pub failed: u64,
    /// Deliveries of a send that had already been delivered.
    pub duplicates: u64,
    /// Copies of a send that arrived in another conversation, at its
    /// sender or at a user who is not a member of its conversation.
    pub misrouted: u64,
    /// The part of `duplicates` seen by a different incarnation of the
    /// recipient's client than the first delivery (after a churn resume).
    pub duplicates_across_resume: u64,
    /// Failures by short code name (sends, receipts, resumes).
    pub errors: BTreeMap<String, u64>,
    /// Connections lost and re-established by client-lib.
    pub reconnects: u64,
    /// Users taken offline by churn.
    pub churn_offline: u64,
    /// Scheduled sends skipped because their sender was offline (churn).
    pub skipped_offline: u64,
    /// Messages from another run (or not from the load generator).
    pub stale: u64,
}

/// The measurements at the end of a run.
#[derive(Debug, Clone)]
pub struct Final {
    /// Counters.
    pub counts: Counts,
    /// Acked sends that missed at least one recipient.
    pub lost: u64,
    /// Recipients acked sends never reached, summed.
    pub lost_deliveries: u64,
    /// Intended send to "sent" ack, µs.
    pub ack: Histogram<u64>,
    /// Intended send to arrival at each recipient, µs.
    pub deliver: Histogram<u64>,
    /// The same for recipients churn had taken offline, µs.
    pub deliver_offline: Histogram<u64>,
    /// Intended send to the last recipient's delivered receipt at the
    /// sender, µs.
    pub receipt: Histogram<u64>,
    /// Intended send to the send handed to its client, µs: the load
    /// generator's own lateness, part of every other latency.
    pub dispatch: Histogram<u64>,
}

/// Collects every event of a run. All methods are cheap and take one lock.
pub struct Tracker {
    /// Each user's conversations (by index), sorted.
    conversations: Vec<Vec<u64>>,
    state: Mutex<State>,
    dispatched: AtomicU64,
    resolved: AtomicU64,
    acked: AtomicU64,
}

struct State {
    sends: Vec<SendRecord>,
    counts: Counts,
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    deliver_offline: Histogram<u64>,
    receipt: Histogram<u64>,
    dispatch: Histogram<u64>,
    watches: HashMap<(u64, usize), ReceiptWatch>,
    /// When the measured window opens and closes (ns on the run's clock).
    window: std::ops::RangeInclusive<u64>,
    /// (send number, recipient index) -> the incarnation of the
    /// recipient's client that saw it first (a new incarnation starts after
    /// each churn resume).
    arrivals: HashMap<(u64, usize), u32>,
    frozen: bool,
}

/// What the progress line needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Sends started, warm-up included.
    pub dispatched: u64,
    /// Sends answered (ack or error), warm-up included.
    pub resolved: u64,
    /// Sends acked, warm-up included.
    pub acked: u64,
    /// Measured failures so far.
    pub errors: u64,
    /// Measured ack p99 so far, ms (0 before the window).
    pub ack_p99_ms: f64,
    /// Connections lost so far.
    pub reconnects: u64,
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

fn record(h: &mut Histogram<u64>, from_ns: u64, to_ns: u64) {
    h.saturating_record(to_ns.saturating_sub(from_ns) / 1_000);
}

impl Tracker {
    /// An empty tracker for users (by index) who are members of
    /// `conversations` (each user's, in any order): a copy that reaches a
    /// user in a conversation they are not in is misrouted, not a
    /// delivery.
    pub fn new(mut conversations: Vec<Vec<u64>>) -> Self {
        for list in &mut conversations {
            list.sort_unstable();
            list.dedup();
        }
        Tracker {
            conversations,
            state: Mutex::new(State {
                sends: Vec::new(),
                counts: Counts::default(),
                ack: histogram(),
                deliver: histogram(),
                deliver_offline: histogram(),
                receipt: histogram(),
                dispatch: histogram(),
                watches: HashMap::new(),
                window: 0..=u64::MAX,
                arrivals: HashMap::new(),
                frozen: false,
            }),
            dispatched: AtomicU64::new(0),
            resolved: AtomicU64::new(0),
            acked: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not hide the measurements.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the measured window: what arrives outside it counts for
    /// correctness but not for the rates.
    pub fn set_window(&self, start_ns: u64, end_ns: u64) {
        self.state().window = start_ns..=end_ns;
    }

    /// Makes room for `sends` sends and `deliveries` arrivals before the
    /// run: growing inside it rehashes under the lock every dispatch and
    /// arrival takes (tens of ms at a million entries), which the run would
    /// report as the server's latency. Best effort: without the memory the
    /// run grows as it goes.
    pub fn reserve(&self, sends: usize, deliveries: usize) {
        let mut s = self.state();
        let _ = s.sends.try_reserve(sends);
        let _ = s.arrivals.try_reserve(deliveries);
    }

    /// Registers a send about to start for `recipients` other members
    /// (`group`: to a group) and returns its number. `at`: when it was
    /// meant to go and when it is handed to its client (ns).
    pub fn dispatch(
        &self,
        measured: bool,
        recipients: u32,
        group: bool,
        conversation_id: u64,
        sender: usize,
        (intended_ns, now_ns): (u64, u64),
    ) -> u64 {
        let mut s = self.state();
        let send_no = s.sends.len() as u64;
        s.sends.push(SendRecord {
            measured,
            recipients,
            conversation_id,
            sender: sender as u32,
            intended_ns,
            ..SendRecord::default()
        });
        if measured && !s.frozen {
            s.counts.sent += 1;
            if group {
                s.counts.group_sends += 1;
            }
            record(&mut s.dispatch, intended_ns, now_ns);
        }
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        send_no
    }

    /// The server acknowledged send `send_no` as `seq` of `conversation_id`.
    pub fn acked(
        &self,
        send_no: u64,
        conversation_id: u64,
        sender: usize,
        seq: u64,
        intended_ns: u64,
        now_ns: u64,
    ) {
        self.resolved.fetch_add(1, Ordering::Relaxed);
        self.acked.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.state();
        let s = &mut *guard;
        if s.frozen {
            return;
        }
        let Some(rec) = s.sends.get_mut(send_no as usize) else {
            return;
        };
        rec.resolved = true;
        rec.acked = true;
        let (measured, recipients) = (rec.measured, rec.recipients);
        s.counts.acked_in_window += u64::from(s.window.contains(&now_ns));
        if measured {
            s.counts.acked += 1;
            if rec.reached >= recipients {
                s.counts.acked_delivered += 1;
            }
            record(&mut s.ack, intended_ns, now_ns);
        }
        let watch = s.watches.entry((conversation_id, sender)).or_default();
        watch.set_recipients(recipients);
        if seq <= watch.floor {
            // The receipt overtook the ack (they travel on different
            // streams); it arrived no later than now.
            if measured {
                s.counts.receipts += 1;
                record(&mut s.receipt, intended_ns, now_ns);
            }
        } else {
            watch.pending.insert(seq, (intended_ns, measured));
        }
    }

    /// Send `send_no` failed; `code` is a short name such as `outbox_full`.
    pub fn failed(&self, send_no: u64, code: &str) {
        self.resolved.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state();
        if s.frozen {
            return;
        }
        let Some(rec) = s.sends.get_mut(send_no as usize) else {
            return;
        };
        rec.resolved = true;
        if rec.measured {
            s.counts.failed += 1;
            *s.counts.errors.entry(code.to_string()).or_default() += 1;
        }
    }

    /// Send `send_no` (measured or not) is a photo.
    pub fn photo(&self, measured: bool) {
        let mut s = self.state();
        if measured && !s.frozen {
            s.counts.photo_sends += 1;
        }
    }

    /// A measured send was a reply.
    pub fn reply(&self, measured: bool) {
        let mut s = self.state();
        if measured && !s.frozen {
            s.counts.reply_sends += 1;
        }
    }

    /// The server acknowledged a reaction a recipient sent.
    pub fn reaction_acked(&self) {
        let mut s = self.state();
        if !s.frozen {
            s.counts.reactions_acked += 1;
        }
    }

    /// A client took a REACTION message.
    pub fn reaction_received(&self) {
        let mut s = self.state();
        if !s.frozen {
            s.counts.reactions_received += 1;
        }
    }

    /// A recipient downloaded a photo and it matched its SHA-256.
    pub fn photo_downloaded(&self) {
        let mut s = self.state();
        if !s.frozen {
            s.counts.photos_downloaded += 1;
        }
    }

    /// Something other than a send failed (mark seen, resume, session end).
    pub fn error(&self, code: &str) {
        let mut s = self.state();
        if !s.frozen {
            *s.counts.errors.entry(code.to_string()).or_default() += 1;
        }
    }

    /// Send `send_no` arrived at recipient `recipient` (client incarnation
    /// `incarnation`) in `conversation_id`.
    pub fn delivered(
        &self,
        send_no: u64,
        recipient: usize,
        conversation_id: u64,
        incarnation: u32,
        intended_ns: u64,
        now_ns: u64,
    ) {
        let at = (intended_ns, now_ns);
        self.arrived(send_no, recipient, conversation_id, incarnation, at, false);
    }

    /// [`delivered`](Self::delivered), to a recipient that churn had taken
    /// offline when the send was meant to go: it came with the catch-up on
    /// their return, and its latency (mostly `--offline-time`) is kept
    /// apart from the online deliveries'.
    pub fn delivered_offline(
        &self,
        send_no: u64,
        recipient: usize,
        conversation_id: u64,
        incarnation: u32,
        intended_ns: u64,
        now_ns: u64,
    ) {
        let at = (intended_ns, now_ns);
        self.arrived(send_no, recipient, conversation_id, incarnation, at, true);
    }

    fn arrived(
        &self,
        send_no: u64,
        recipient: usize,
        conversation_id: u64,
        incarnation: u32,
        (intended_ns, now_ns): (u64, u64),
        offline: bool,
    ) {
        let mut guard = self.state();
        let s = &mut *guard;
        if s.frozen {
            return;
        }
        let Some(rec) = s.sends.get_mut(send_no as usize) else {
            s.counts.stale += 1;
            return;
        };
        // Warm-up sends count only toward the window's rates.
        let measured = rec.measured;
        let member = self
            .conversations
            .get(recipient)
            .is_some_and(|list| list.binary_search(&conversation_id).is_ok());
        if rec.conversation_id != conversation_id || rec.sender as usize == recipient || !member {
            // Not one of its recipients: counting it would let a copy in
            // the wrong place stand in for one that never arrived.
            s.counts.misrouted += u64::from(measured);
            return;
        }
        match s.arrivals.entry((send_no, recipient)) {
            Entry::Occupied(first) => {
                if measured {
                    s.counts.duplicates += 1;
                    if *first.get() != incarnation {
                        s.counts.duplicates_across_resume += 1;
                    }
                }
                return;
            }
            Entry::Vacant(slot) => {
                slot.insert(incarnation);
            }
        }
        rec.reached += 1;
        let complete = rec.reached == rec.recipients;
        if s.window.contains(&now_ns) {
            s.counts.deliveries_in_window += 1;
            s.counts.delivered_in_window += u64::from(complete);
        }
        if !measured {
            return;
        }
        s.counts.deliveries += 1;
        if complete {
            s.counts.delivered += 1;
            if rec.acked {
                s.counts.acked_delivered += 1;
            }
        }
        if offline {
            record(&mut s.deliver_offline, intended_ns, now_ns);
        } else {
            record(&mut s.deliver, intended_ns, now_ns);
        }
    }

    /// Member `reporter` of `conversation_id` reported everything up to
    /// `delivered_seq` delivered; `sender` is the user whose messages wait
    /// for it.
    pub fn receipt(
        &self,
        conversation_id: u64,
        sender: usize,
        reporter: u64,
        delivered_seq: u64,
        now_ns: u64,
    ) {
        let mut guard = self.state();
        let s = &mut *guard;
        if s.frozen {
            return;
        }
        let watch = s.watches.entry((conversation_id, sender)).or_default();
        if !watch.report(reporter, delivered_seq) {
            return;
        }
        let floor = watch.floor;
        let later = watch.pending.split_off(&(floor + 1));
        let done = std::mem::replace(&mut watch.pending, later);
        for (intended_ns, measured) in done.into_values() {
            if measured {
                s.counts.receipts += 1;
                record(&mut s.receipt, intended_ns, now_ns);
            }
        }
    }

    /// A message that is not from this run.
    pub fn stale(&self) {
        let mut s = self.state();
        if !s.frozen {
            s.counts.stale += 1;
        }
    }

    /// A client was told that another member is typing, or stopped.
    pub fn typing_received(&self) {
        let mut s = self.state();
        if !s.frozen {
            s.counts.typing_received += 1;
        }
    }

    /// A client lost its connection (it reconnects by itself).
    pub fn reconnect(&self) {
        let mut s = self.state();
        if !s.frozen {
            s.counts.reconnects += 1;
        }
    }

    /// Churn took a user offline.
    pub fn churn_offline(&self) {
        let mut s = self.state();
        if !s.frozen {
            s.counts.churn_offline += 1;
        }
    }

    /// A scheduled send was skipped because its sender was offline.
    pub fn skipped_offline(&self, measured: bool) {
        let mut s = self.state();
        if measured && !s.frozen {
            s.counts.skipped_offline += 1;
        }
    }

    /// Whether every measured send is answered, every acked one delivered
    /// and its receipt back: the drain can stop early.
    pub fn complete(&self) -> bool {
        let s = self.state();
        let c = &s.counts;
        c.acked + c.failed == c.sent && c.acked_delivered == c.acked && c.receipts == c.acked
    }

    /// Numbers for the progress line.
    pub fn progress(&self) -> Progress {
        let s = self.state();
        Progress {
            dispatched: self.dispatched.load(Ordering::Relaxed),
            resolved: self.resolved.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            errors: s.counts.errors.values().sum(),
            ack_p99_ms: if s.ack.is_empty() {
                0.0
            } else {
                s.ack.value_at_quantile(0.99) as f64 / 1_000.0
            },
            reconnects: s.counts.reconnects,
        }
    }

    /// Stops counting and returns the measurements. Measured sends still
    /// unanswered count as errors `no_ack`; acked sends never delivered are
    /// `lost`.
    pub fn freeze(&self, now_ns: u64) -> Final {
        let mut guard = self.state();
        let s = &mut *guard;
        s.frozen = true;
        // What never came counts as late as the run could see: a send that
        // failed or was never answered in the ack percentiles, and every
        // recipient it did not reach in the deliver ones. Left out, a
        // stalled server's refused sends (a full outbox) would leave the
        // percentiles looking better the more it refused.
        for r in s.sends.iter().filter(|r| r.measured) {
            if !r.acked {
                record(&mut s.ack, r.intended_ns, now_ns);
            }
            for _ in r.reached..r.recipients {
                record(&mut s.deliver, r.intended_ns, now_ns);
            }
        }
        // And an acked send whose receipts never all came back, in the
        // receipt ones: a server that drops receipts must not look faster.
        for watch in s.watches.values() {
            for &(intended_ns, measured) in watch.pending.values() {
                if measured {
                    record(&mut s.receipt, intended_ns, now_ns);
                }
            }
        }
        let unanswered = s.sends.iter().filter(|r| r.measured && !r.resolved).count() as u64;
        if unanswered > 0 {
            s.counts.failed += unanswered;
            *s.counts.errors.entry("no_ack".into()).or_default() += unanswered;
        }
        let missed = s
            .sends
            .iter()
            .filter(|r| r.measured && r.acked && r.reached < r.recipients);
        let (lost, lost_deliveries) = missed.fold((0, 0), |(sends, members), r| {
            (sends + 1, members + u64::from(r.recipients - r.reached))
        });
        Final {
            counts: s.counts.clone(),
            lost,
            lost_deliveries,
            ack: s.ack.clone(),
            deliver: s.deliver.clone(),
            deliver_offline: s.deliver_offline.clone(),
            receipt: s.receipt.clone(),
            dispatch: s.dispatch.clone(),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1_000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The three latencies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    /// Intended send to "sent" (the server's durable ack).
    pub ack: Percentiles,
    /// Intended send to arrival in a recipient's app (each recipient of a
    /// group send is one sample), for recipients online when it was meant
    /// to go (and every recipient it never reached, as late as the run saw).
    pub deliver: Percentiles,
    /// The same for recipients churn had taken offline then: they had it
    /// from catch-up on their return, so it measures `--offline-time` more
    /// than the server.
    #[serde(default)]
    pub deliver_offline: Percentiles,
    /// Intended send to the delivered receipt back at the sender (for a
    /// group send: the last recipient's).
    pub receipt: Percentiles,
    /// Intended send to the moment the load generator handed it to its
    /// client: its own lateness (a busy scheduler, the timer's 1 ms tick),
    /// which every latency above includes.
    #[serde(default)]
    pub dispatch: Percentiles,
}

/// The result of a run; serialised as the `--json` file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Workload profile name.
    pub profile: String,
    /// Shard, `i/n`.
    pub shard: String,
    /// Virtual users.
    pub users: u64,
    /// QUIC connections up when the measured window opened (one per
    /// online user).
    pub connections: u64,
    /// Those up when it closed.
    #[serde(default)]
    pub connections_at_end: u64,
    /// UDP sockets they share.
    pub endpoints: usize,
    /// Sends per second offered.
    pub offered_rate: f64,
    /// Schedule seed.
    pub seed: u64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Uncounted warm-up, seconds.
    pub warmup_s: f64,
    /// Measured sends attempted.
    pub sent: u64,
    /// The part of `sent` that went to groups (`--group-fraction`).
    #[serde(default)]
    pub group_sends: u64,
    /// The part of `sent` that were photos (`--photo-fraction`): uploaded
    /// on a media stream, then sent; their latencies count from the
    /// intended send time, upload included.
    #[serde(default)]
    pub photo_sends: u64,
    /// Photos recipients downloaded whole and checked (one per recipient
    /// and photo delivered to it).
    #[serde(default)]
    pub photos_downloaded: u64,
    /// Typing starts and stops recipients' clients were told of
    /// (`--typing-fraction`), over the whole run, warm-up and drain
    /// included (they carry no send number): best effort (the server
    /// offers them; a device short of room misses one).
    #[serde(default)]
    pub typing_received: u64,
    /// The part of `sent` that replied to an earlier message
    /// (`--reply-fraction`).
    #[serde(default)]
    pub reply_sends: u64,
    /// Reactions recipients sent (`--reaction-fraction`) that the server
    /// acknowledged, and the REACTION messages clients were delivered,
    /// over the whole run (they carry no send number; not checked like
    /// messages, and not part of `sent`).
    #[serde(default)]
    pub reactions_acked: u64,
    #[serde(default)]
    pub reactions_received: u64,
    /// Notifications the stand-in push gateway took (`--push`), to the
    /// end of the drain, and the devices they named.
    #[serde(default)]
    pub notifications: u64,
    #[serde(default)]
    pub notified_devices: u64,
    /// Acked as durable.
    pub acked: u64,
    /// Acks that arrived within the measured window, of any send (warm-up
    /// ones included, so it may exceed `acked`): `acked_per_s` and the
    /// per-send CPU and datagrams divide by it.
    #[serde(default)]
    pub acked_in_window: u64,
    /// Delivered to every recipient at least once.
    pub delivered: u64,
    /// Arrivals at one recipient each: a 1-1 send makes one, a group send
    /// one per other member.
    #[serde(default)]
    pub deliveries: u64,
    /// Acked but not delivered to every recipient.
    pub lost: u64,
    /// Recipients that acked sends never reached, summed.
    #[serde(default)]
    pub lost_deliveries: u64,
    /// Delivered to the app more than once.
    pub duplicates: u64,
    /// Duplicates that crossed a churn resume (client-lib's deduplication
    /// is per client instance).
    pub duplicates_across_resume: u64,
    /// Copies that arrived in another conversation, at their sender or at
    /// a user who is not a member (not counted as deliveries).
    #[serde(default)]
    pub misrouted: u64,
    /// Sends whose delivered receipts (from every recipient) came back to
    /// the sender.
    pub receipts: u64,
    /// Failures by short code name.
    pub errors: BTreeMap<String, u64>,
    /// Sends acked within the window, per second of it (the achieved
    /// rate).
    pub acked_per_s: f64,
    /// Sends delivered to every recipient within the window, per second.
    pub delivered_per_s: f64,
    /// Arrivals at recipients within the window, per second (the fan-out
    /// the server carried).
    #[serde(default)]
    pub deliveries_per_s: f64,
    /// Latency percentiles, ms.
    pub latency_ms: Latencies,
    /// Connections lost and re-established by client-lib, as their
    /// `Disconnected` events told: a lower bound, since client-lib drops
    /// connection-state events when a receiver's event queue is full.
    pub reconnects: u64,
    /// Users taken offline by churn.
    pub churn_offline: u64,
    /// Users whose app was in the background (no heartbeats).
    #[serde(default)]
    pub background_users: u64,
    /// Sends skipped because the sender was offline.
    pub skipped_offline: u64,
    /// Messages from another run, ignored.
    pub stale_messages: u64,
    /// Server CPU over the window, percent of one core (`--server-pid`, or
    /// the in-process server's threads with `--spawn-server`).
    pub server_cpu_pct: Option<f64>,
    /// Server CPU microseconds per acked send.
    pub server_cpu_us_per_send: Option<f64>,
    /// Server CPU over the window by thread name, percent of one core
    /// (threads sharing a name, like a runtime's workers, are summed):
    /// shows whether the transport or the store thread bounds a node.
    #[serde(default)]
    pub server_cpu_by_thread: BTreeMap<String, f64>,
    /// This process's CPU over the window, percent of one core (without
    /// the in-process server's threads with `--spawn-server`).
    pub loadgen_cpu_pct: Option<f64>,
    /// Tokio worker threads the load generator ran (`--threads`).
    pub loadgen_threads: usize,
    /// UDP datagrams dropped machine-wide for a full socket receive buffer
    /// during the window: each one is a QUIC loss, and its retransmission
    /// is latency the server may not have caused.
    #[serde(default)]
    pub udp_rcvbuf_drops: Option<u64>,
    /// UDP datagrams sent machine-wide during the window per acked send:
    /// both ends' packets, data and QUIC acks alike (a bare relay moves
    /// about 3 per message). Only on a machine running nothing else.
    #[serde(default)]
    pub udp_datagrams_per_send: Option<f64>,
    /// CPU of each `--backend` over the window (Postgres, Redis): what the
    /// stores cost per send beside the server.
    #[serde(default)]
    pub backend_cpu: BTreeMap<String, BackendCpu>,
    /// A `--calls` run's figures (its message fields stay zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<crate::calls::CallsReport>,
}

/// One `--backend`'s CPU over the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BackendCpu {
    /// Percent of one core.
    pub cpu_pct: f64,
    /// Microseconds per acked send.
    pub cpu_us_per_send: Option<f64>,
}

/// Load generator CPU per worker thread (percent of a core) at which the
/// report warns that the load generator, not the server, bounds the run.
const LOADGEN_SATURATED_PCT: f64 = 90.0;

impl Report {
    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serialises")
    }

    /// The human-readable table printed at the end.
    pub fn table(&self) -> String {
        if let Some(calls) = &self.calls {
            return calls.table(self);
        }
        let mut t = String::new();
        let _ = writeln!(
            t,
            "chat-loadgen: profile {}, shard {}, {} users over {} UDP sockets, {} connected when the window opened and {} when it closed",
            self.profile,
            self.shard,
            self.users,
            self.endpoints,
            self.connections,
            self.connections_at_end
        );
        let _ = writeln!(
            t,
            "offered {:.1} sends/s for {:.1}s (after {:.1}s warm-up), seed {}",
            self.offered_rate, self.duration_s, self.warmup_s, self.seed
        );
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "", "sent", "acked", "delivered", "receipts", "lost", "duplicates"
        );
        let _ = writeln!(
            t,
            "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "count",
            self.sent,
            self.acked,
            self.delivered,
            self.receipts,
            self.lost,
            self.duplicates
        );
        let _ = writeln!(
            t,
            "{:<10} {:>10} {:>10.1} {:>10.1}",
            "per second", "", self.acked_per_s, self.delivered_per_s
        );
        let _ = writeln!(
            t,
            "group sends: {}  deliveries (one per recipient): {} = {:.1}/s  lost deliveries: {}",
            self.group_sends, self.deliveries, self.deliveries_per_s, self.lost_deliveries
        );
        if self.notifications > 0 {
            let _ = writeln!(
                t,
                "notifications at the push gateway: {} ({} devices)",
                self.notifications, self.notified_devices
            );
        }
        if self.photo_sends > 0 || self.photos_downloaded > 0 {
            let _ = writeln!(
                t,
                "photo sends: {}  photos downloaded by recipients: {}",
                self.photo_sends, self.photos_downloaded
            );
        }
        if self.typing_received > 0 {
            let _ = writeln!(
                t,
                "typing starts and stops recipients were told of: {}",
                self.typing_received
            );
        }
        if self.reply_sends > 0 || self.reactions_acked > 0 || self.reactions_received > 0 {
            let _ = writeln!(
                t,
                "replies: {}  reactions acked: {}  reactions delivered: {}",
                self.reply_sends, self.reactions_acked, self.reactions_received
            );
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency ms", "p50", "p90", "p99", "p99.9", "max", "samples"
        );
        let offline = (self.latency_ms.deliver_offline.count > 0)
            .then_some(("offline", &self.latency_ms.deliver_offline));
        for (name, p) in [
            Some(("ack", &self.latency_ms.ack)),
            Some(("deliver", &self.latency_ms.deliver)),
            offline,
            Some(("receipt", &self.latency_ms.receipt)),
            Some(("dispatch", &self.latency_ms.dispatch)),
        ]
        .into_iter()
        .flatten()
        {
            let _ = writeln!(
                t,
                "{:<10} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10}",
                name, p.p50, p.p90, p.p99, p.p999, p.max, p.count
            );
        }
        if offline.is_some() {
            let _ = writeln!(
                t,
                "(offline: deliveries to users churn had taken offline, on their return; not in deliver)"
            );
        }
        let _ = writeln!(t);
        if self.errors.is_empty() {
            let _ = writeln!(t, "errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(code, n)| format!("{code}={n}"))
                .collect();
            let _ = writeln!(t, "errors: {}", list.join(" "));
        }
        let _ = writeln!(
            t,
            "reconnects: {}  churn offline: {}  skipped (sender offline): {}  duplicates across resume: {}  misrouted: {}  stale messages: {}",
            self.reconnects,
            self.churn_offline,
            self.skipped_offline,
            self.duplicates_across_resume,
            self.misrouted,
            self.stale_messages
        );
        match (self.server_cpu_pct, self.server_cpu_us_per_send) {
            (Some(pct), Some(per)) => {
                let _ = writeln!(
                    t,
                    "server cpu: {pct:.1}% of one core, {per:.1} µs per acked send"
                );
            }
            (Some(pct), None) => {
                let _ = writeln!(t, "server cpu: {pct:.1}% of one core");
            }
            _ => {
                let _ = writeln!(t, "server cpu: n/a (pass --server-pid)");
            }
        }
        if !self.server_cpu_by_thread.is_empty() {
            let mut threads: Vec<(&String, &f64)> = self.server_cpu_by_thread.iter().collect();
            threads.sort_by(|a, b| b.1.total_cmp(a.1));
            let list: Vec<String> = threads
                .into_iter()
                .filter(|(_, pct)| **pct >= 0.05)
                .map(|(name, pct)| format!("{name} {pct:.1}%"))
                .collect();
            let _ = writeln!(t, "server cpu by thread: {}", list.join(", "));
        }
        for (name, b) in &self.backend_cpu {
            let _ = write!(t, "{name} cpu: {:.1}% of one core", b.cpu_pct);
            let _ = match b.cpu_us_per_send {
                Some(per) => writeln!(t, ", {per:.1} µs per acked send"),
                None => writeln!(t),
            };
        }
        if let Some(pct) = self.loadgen_cpu_pct {
            let _ = write!(t, "load generator cpu: {pct:.1}% of one core");
            let _ = writeln!(
                t,
                "{}",
                if pct >= LOADGEN_SATURATED_PCT * self.loadgen_threads as f64 {
                    " (near 100% per thread: the numbers are bounded by the load generator)"
                } else {
                    ""
                }
            );
        }
        if let Some(per_send) = self.udp_datagrams_per_send {
            let _ = writeln!(
                t,
                "udp datagrams sent (whole machine): {per_send:.2} per acked send"
            );
        }
        match self.udp_rcvbuf_drops {
            Some(0) => {
                let _ = writeln!(t, "udp receive-buffer drops (whole machine): 0");
            }
            Some(n) => {
                let _ = writeln!(
                    t,
                    "udp receive-buffer drops (whole machine): {n} (each is a QUIC loss: \
                     latency includes retransmissions; raise the socket receive buffers)"
                );
            }
            None => {}
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracker for 8 users who are all in conversations 0 and 7.
    fn tracker() -> Tracker {
        Tracker::new(vec![vec![0, 7]; 8])
    }

    #[test]
    fn rates_count_only_what_came_before_the_window_closed() {
        // A server that falls behind: of three sends in the window, one is
        // acked and delivered in it, two only in the drain. All three count
        // as acked (nothing lost), but only one as carried in the window.
        let t = tracker();
        t.set_window(1_000_000, 10_000_000);
        let sends: Vec<u64> = (0..3)
            .map(|_| t.dispatch(true, 1, false, 0, 0, (0, 0)))
            .collect();
        for (i, &send) in sends.iter().enumerate() {
            let at = 9_000_000 + i as u64 * 2_000_000;
            t.acked(send, 9, 0, i as u64 + 1, 1_000_000, at);
            t.delivered(send, 1, 0, 0, 1_000_000, at + 500_000);
        }
        let c = t.freeze(0).counts;
        assert_eq!((c.acked, c.delivered, c.deliveries), (3, 3, 3));
        assert_eq!(c.acked_in_window, 1);
        assert_eq!((c.delivered_in_window, c.deliveries_in_window), (1, 1));
    }

    #[test]
    fn the_load_generators_own_lateness_is_measured_apart() {
        // Sends handed to their clients 3 ms after they were meant to go
        // (a busy scheduler): the dispatch percentiles say so, and the ack
        // latency, from the intended time, includes it. Warm-up sends do
        // not count.
        let t = tracker();
        let late = 3_000_000;
        let warm = t.dispatch(false, 1, false, 7, 0, (0, 50_000_000));
        t.acked(warm, 7, 0, 1, 0, 60_000_000);
        for i in 0..10 {
            let intended = 1_000_000_000 + i * 10_000_000;
            let send = t.dispatch(true, 1, false, 7, 0, (intended, intended + late));
            t.acked(send, 7, 0, i + 2, intended, intended + late + 1_000_000);
        }
        let fin = t.freeze(2_000_000_000);
        let dispatch = Percentiles::of(&fin.dispatch);
        assert_eq!(dispatch.count, 10);
        assert!((dispatch.p99 - 3.0).abs() < 0.01, "{dispatch:?}");
        let ack = Percentiles::of(&fin.ack);
        assert!((ack.p50 - 4.0).abs() < 0.01, "{ack:?}");
    }

    #[test]
    fn rates_count_what_arrived_in_the_window_of_any_send() {
        // A server that keeps up with a 100 ms ack latency: the window's
        // last sends are acked after it closes, and warm-up sends inside
        // it; counting only the window's own sends would show it short by
        // the latency over the window.
        let t = tracker();
        t.set_window(1_000_000_000, 2_000_000_000);
        let mut in_window = 0;
        for i in 0..30 {
            // One send every 100 ms from 0.1 s, each acked and delivered
            // 100 ms after it was meant to leave.
            let intended = 100_000_000 * (i + 1);
            let measured = (1_000_000_000..2_000_000_000).contains(&intended);
            let send = t.dispatch(measured, 1, false, 7, 0, (intended, intended));
            let at = intended + 100_000_000;
            t.acked(send, 7, 0, i + 1, intended, at);
            t.delivered(send, 1, 7, 0, intended, at);
            in_window += u64::from((1_000_000_000..=2_000_000_000).contains(&at));
        }
        let c = t.freeze(3_000_000_000).counts;
        assert_eq!(c.sent, 10);
        assert_eq!(in_window, 11);
        assert_eq!(c.acked_in_window, in_window);
        assert_eq!(c.delivered_in_window, in_window);
        assert_eq!(c.deliveries_in_window, in_window);
        // Only the measured sends count for correctness.
        assert_eq!((c.acked, c.delivered, c.deliveries), (10, 10, 10));
    }

    #[test]
    fn receipts_that_never_came_count_as_late_as_the_run_saw() {
        let t = tracker();
        let a = t.dispatch(true, 1, false, 7, 0, (0, 0));
        let b = t.dispatch(true, 1, false, 7, 0, (0, 0));
        t.acked(a, 7, 0, 1, 0, 1_000_000);
        t.acked(b, 7, 0, 2, 0, 1_000_000);
        t.delivered(a, 1, 7, 0, 0, 2_000_000);
        t.delivered(b, 1, 7, 0, 0, 2_000_000);
        // The recipient reports only the first delivered.
        t.receipt(7, 0, 501, 1, 3_000_000);
        let f = t.freeze(60_000_000);
        assert_eq!(f.counts.receipts, 1);
        assert_eq!(f.receipt.len(), 2);
        let max = f.receipt.max();
        assert!(
            (59_000..=61_000).contains(&max),
            "b's receipt counts at the freeze: {max}"
        );
    }

    #[test]
    fn a_send_is_acked_delivered_and_receipted_once() {
        let t = tracker();
        let warm = t.dispatch(false, 1, false, 0, 0, (0, 0));
        let a = t.dispatch(true, 1, false, 0, 0, (0, 0));
        let b = t.dispatch(true, 1, false, 0, 0, (0, 0));
        let c = t.dispatch(true, 1, false, 0, 0, (0, 0));
        t.acked(warm, 9, 0, 1, 0, 5_000_000);
        t.acked(a, 9, 0, 2, 1_000_000, 3_000_000);
        t.delivered(a, 1, 0, 0, 1_000_000, 4_000_000);
        t.delivered(a, 1, 0, 0, 1_000_000, 4_500_000);
        t.delivered(a, 1, 0, 1, 1_000_000, 4_600_000);
        // b is delivered before its ack, and its receipt overtakes the ack.
        t.delivered(b, 1, 0, 0, 2_000_000, 5_000_000);
        t.receipt(9, 0, 501, 3, 6_000_000);
        t.acked(b, 9, 0, 3, 2_000_000, 7_000_000);
        t.failed(c, "outbox_full");
        assert!(t.complete());
        let f = t.freeze(9_000_000);
        let c = &f.counts;
        assert_eq!((c.sent, c.acked, c.delivered, c.failed), (3, 2, 2, 1));
        assert_eq!((c.duplicates, c.duplicates_across_resume), (2, 1));
        assert_eq!(c.receipts, 2);
        assert_eq!(c.errors.get("outbox_full"), Some(&1));
        assert_eq!(f.lost, 0);
        // a after 2 ms, b after 5; the failed c counts as late as the run
        // saw (9 ms), in the acks and in the deliveries alike.
        assert_eq!((f.ack.len(), f.deliver.len()), (3, 3));
        let ack = Percentiles::of(&f.ack);
        assert!((ack.max - 9.0).abs() < 0.01, "{ack:?}");
        assert!((ack.p50 - 5.0).abs() < 0.01, "{ack:?}");
        let deliver = Percentiles::of(&f.deliver);
        assert!((deliver.max - 9.0).abs() < 0.01, "{deliver:?}");
        // Frozen: nothing more counts.
        t.failed(b, "late");
        assert!(!t.freeze(0).counts.errors.contains_key("late"));
    }

    #[test]
    fn deliveries_to_users_who_were_offline_are_kept_apart() {
        // A recipient churn took away has a message on its return, seconds
        // late: that is its offline time, not the server's latency, and it
        // used to be the deliver tail of every default (churning) run.
        let t = tracker();
        let a = t.dispatch(true, 1, false, 0, 0, (0, 0));
        let b = t.dispatch(true, 1, false, 0, 0, (0, 0));
        t.delivered(a, 1, 0, 0, 0, 2_000_000);
        t.delivered_offline(b, 1, 0, 1, 0, 5_000_000_000);
        let f = t.freeze(6_000_000_000);
        assert_eq!(f.counts.deliveries, 2);
        assert_eq!((f.deliver.len(), f.deliver_offline.len()), (1, 1));
        assert!((Percentiles::of(&f.deliver).max - 2.0).abs() < 0.01);
        assert!(Percentiles::of(&f.deliver_offline).max > 4_900.0);
    }

    #[test]
    fn unanswered_and_undelivered_sends_are_reported() {
        let t = tracker();
        let a = t.dispatch(true, 1, false, 0, 0, (0, 0));
        let _b = t.dispatch(true, 1, false, 0, 0, (0, 0));
        t.acked(a, 1, 0, 1, 0, 1_000);
        assert!(!t.complete());
        let f = t.freeze(0);
        assert_eq!(f.lost, 1);
        assert_eq!(f.lost_deliveries, 1);
        assert_eq!(f.counts.errors.get("no_ack"), Some(&1));
        assert_eq!(f.counts.failed, 1);
    }

    #[test]
    fn a_group_send_counts_once_it_reached_every_recipient() {
        let t = tracker();
        // User 0 sends to a group of four (recipients 1, 2, 3; user ids
        // 101..=103), twice.
        let a = t.dispatch(true, 3, true, 0, 0, (0, 0));
        let b = t.dispatch(true, 3, true, 0, 0, (0, 0));
        t.acked(a, 7, 0, 1, 0, 1_000_000);
        t.acked(b, 7, 0, 2, 0, 1_000_000);
        for r in 1..=3 {
            t.delivered(a, r, 0, 0, 0, 2_000_000);
        }
        t.delivered(a, 2, 0, 0, 0, 2_500_000);
        t.delivered(b, 1, 0, 0, 0, 3_000_000);
        t.delivered(b, 3, 0, 0, 0, 3_000_000);
        // Two of three receipts cover both sends: neither is complete.
        t.receipt(7, 0, 101, 2, 4_000_000);
        t.receipt(7, 0, 103, 2, 4_000_000);
        // Another member's receipts in a group the sender also reads do not
        // count for user 0's sends.
        t.receipt(7, 1, 102, 2, 4_000_000);
        assert!(!t.complete());
        {
            let s = t.state();
            assert_eq!(s.counts.receipts, 0);
        }
        // The last one completes a only.
        t.receipt(7, 0, 102, 1, 5_000_000);
        let f = t.freeze(0);
        let c = &f.counts;
        assert_eq!((c.sent, c.group_sends, c.acked), (2, 2, 2));
        assert_eq!((c.delivered, c.deliveries, c.duplicates), (1, 5, 1));
        assert_eq!(c.receipts, 1);
        assert_eq!((f.lost, f.lost_deliveries), (1, 1));
        // One sample per arrival, and one for b's recipient it never
        // reached (as late as the run saw).
        assert_eq!(f.deliver.len(), 6, "one sample per recipient");
        let receipt = Percentiles::of(&f.receipt);
        assert!((receipt.max - 5.0).abs() < 0.01, "{receipt:?}");
    }

    #[test]
    fn the_receipt_floor_is_the_lowest_member_once_all_reported() {
        let mut w = ReceiptWatch::default();
        assert!(!w.report(1, 5), "recipients unknown yet");
        w.set_recipients(3);
        assert_eq!(w.floor, 0);
        assert!(!w.report(2, 4));
        assert!(w.report(3, 4), "all three reported: floor 4");
        assert_eq!((w.floor, w.at_floor), (4, 2));
        assert!(!w.report(2, 9), "3 is still at 4");
        assert!(!w.report(3, 3), "watermarks only move forward");
        assert!(w.report(3, 6));
        assert_eq!((w.floor, w.at_floor), (5, 1));
        assert!(w.report(1, 7));
        assert_eq!(w.floor, 6);
        // Brute force agrees over a longer random walk.
        let mut w = ReceiptWatch::default();
        w.set_recipients(4);
        let mut marks = [0u64; 4];
        let mut x = 12345u64;
        for _ in 0..2_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let member = (x >> 33) as usize % 4;
            let seq = marks[member] + (x >> 40) % 3;
            let before = w.floor;
            let rose = w.report(member as u64 + 1, seq);
            marks[member] = marks[member].max(seq);
            let want = if marks.iter().all(|&m| m > 0) || w.delivered.len() == 4 {
                *marks.iter().min().unwrap()
            } else {
                0
            };
            assert_eq!(w.floor, want);
            assert_eq!(rose, want > before);
        }
    }

    #[test]
    fn empty_percentiles_are_zero() {
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }

    #[test]
    fn the_table_lists_server_threads_busiest_first() {
        let report = Report {
            server_cpu_pct: Some(90.0),
            server_cpu_by_thread: BTreeMap::from([
                ("sqlite-store".to_string(), 38.5),
                ("tokio-rt-worker".to_string(), 51.5),
                ("idle-helper".to_string(), 0.0),
            ]),
            ..Report::default()
        };
        let table = report.table();
        assert!(
            table.contains("server cpu by thread: tokio-rt-worker 51.5%, sqlite-store 38.5%\n"),
            "{table}"
        );
        assert!(!Report::default().table().contains("server cpu by thread"));
    }

    #[test]
    fn the_saturation_caveat_shows_only_near_a_full_core_per_thread() {
        let table = |pct: f64, threads: usize| {
            Report {
                loadgen_cpu_pct: Some(pct),
                loadgen_threads: threads,
                ..Report::default()
            }
            .table()
        };
        let caveat = "bounded by the load generator";
        assert!(!table(52.0, 1).contains(caveat));
        assert!(table(95.0, 1).contains(caveat));
        assert!(
            !table(95.0, 2).contains(caveat),
            "two threads have two cores"
        );
        assert!(table(185.0, 2).contains(caveat));
    }

    #[test]
    fn copies_in_the_wrong_place_are_misrouted_not_delivered() {
        // Users 0 and 1 talk in conversation 7; user 2 is in 9 only.
        let t = Tracker::new(vec![vec![7], vec![7], vec![9]]);
        let send = t.dispatch(true, 1, false, 7, 0, (0, 0));
        // At its sender, in another conversation, and in its conversation
        // at a user who is not in it: none counts.
        t.delivered(send, 0, 7, 0, 0, 1_000_000);
        t.delivered(send, 1, 8, 0, 0, 1_000_000);
        t.delivered(send, 2, 7, 0, 0, 1_000_000);
        t.acked(send, 7, 0, 1, 0, 1_000_000);
        // The real recipient's copy does.
        t.delivered(send, 1, 7, 0, 0, 2_000_000);
        let c = t.freeze(0).counts;
        assert_eq!((c.misrouted, c.deliveries, c.delivered), (3, 1, 1));
    }
}
