//! The ordered, bounded queue of sends the server has not confirmed yet.
//!
//! Each entry keeps its encoded `Send` frame (with its `client_msg_id`), so a
//! resend after a reconnect is byte-for-byte the original request and the
//! server recognises it as a retry. Entries are resent in their original
//! order; an entry leaves only when the server answers it.
//!
//! After a retryable refusal (RATE_LIMITED) the server refuses every later
//! send on the connection until the refused one comes back, so the
//! outbox, when the pause ends, resends from its earliest refused entry
//! onward, in order. Entries before it were accepted and await their ack.
//!
//! It does not resend all of them at once: a user's bucket that just ran
//! dry refills a token at a time, so a backlog of N resent whole after each
//! pause was refused again but for its head, N²/2 frames to clear it (half
//! a million for a full outbox of 1,000). After a pause the outbox keeps a
//! send window instead, as TCP's slow start does: one send on the wire,
//! then twice as many for each answer, until the window holds everything
//! waiting and the outbox is open again. A refusal shuts it back to one.

use std::collections::VecDeque;

use bytes::Bytes;
use chat_protocol::proto;
use tokio::sync::oneshot;

use crate::error::ClientError;

/// Resolves a `send_text` call.
pub(crate) type Waiter = oneshot::Sender<Result<proto::SendAck, ClientError>>;

pub(crate) struct Entry {
    pub(crate) request_id: u64,
    /// The send's conversation and `client_msg_id`.
    key: (u64, String),
    pub(crate) frame: Bytes,
    /// Length of the send's text, in bytes.
    text_len: usize,
    waiter: Option<Waiter>,
    /// Not (or no longer) on the wire of the live connection: never
    /// transmitted, or refused.
    unsent: bool,
}

pub(crate) struct Outbox {
    entries: VecDeque<Entry>,
    limit: usize,
    /// Set while the server asked us to wait (RATE_LIMITED and other
    /// retryable refusals): nothing is transmitted until then, and then
    /// the outbox is resent in order from its first unsent entry, so a
    /// refused send is never overtaken by a later one.
    paused_until: Option<tokio::time::Instant>,
    /// Since a pause: how many entries may be on the wire at once (see the
    /// module docs); `None` once the window has opened.
    window: Option<usize>,
}

impl Outbox {
    pub(crate) fn new(limit: usize) -> Self {
        Outbox {
            entries: VecDeque::new(),
            limit: limit.max(1),
            paused_until: None,
            window: None,
        }
    }

    /// Adds a send; refuses when full. True if the caller transmits it now
    /// (`live`: there is a connection): not during a pause, not past the
    /// send window, and never ahead of an entry still to be sent.
    pub(crate) fn push(
        &mut self,
        request_id: u64,
        key: (u64, String),
        (frame, text_len): (Bytes, usize),
        waiter: Waiter,
        live: bool,
    ) -> Result<bool, ClientError> {
        if self.entries.len() >= self.limit {
            return Err(ClientError::OutboxFull(self.entries.len()));
        }
        let now =
            live && !self.is_paused() && !self.entries.iter().any(|e| e.unsent) && self.room() > 0;
        self.entries.push_back(Entry {
            request_id,
            key,
            frame,
            text_len,
            waiter: Some(waiter),
            unsent: !now,
        });
        Ok(now)
    }

    /// How many more entries may go on the wire now.
    fn room(&self) -> usize {
        match self.window {
            None => usize::MAX,
            Some(window) => {
                let on_wire = self.entries.iter().filter(|e| !e.unsent).count();
                window.saturating_sub(on_wire)
            }
        }
    }

    /// Removes the entry the server answered and resolves its caller; an
    /// answer doubles the send window (see [`transmit`](Self::transmit)
    /// for what may then go). Returns false if no entry had that request
    /// id (e.g. a duplicate answer after a resend).
    pub(crate) fn complete(
        &mut self,
        request_id: u64,
        result: Result<proto::SendAck, ClientError>,
    ) -> bool {
        let Some(pos) = self.entries.iter().position(|e| e.request_id == request_id) else {
            return false;
        };
        let mut entry = self.entries.remove(pos).expect("position is in range");
        if let Some(waiter) = entry.waiter.take() {
            // The caller may have stopped waiting; the send still happened.
            let _ = waiter.send(result);
        }
        if let Some(window) = self.window {
            let window = window.saturating_mul(2);
            // Open once it would hold every entry waiting.
            self.window = (window < self.entries.len()).then_some(window);
        }
        true
    }

    /// Fails the sends whose text is longer than `max_text_len`, the limit
    /// of a new connection's server: it would refuse them, or close the
    /// connection for a frame too large, on every reconnect.
    /// True if it failed any.
    pub(crate) fn fail_longer_than(&mut self, max_text_len: usize) -> bool {
        let before = self.entries.len();
        self.entries.retain_mut(|entry| {
            if entry.text_len <= max_text_len {
                return true;
            }
            if let Some(waiter) = entry.waiter.take() {
                let _ = waiter.send(Err(too_long(entry.text_len, max_text_len)));
            }
            false
        });
        self.entries.len() < before
    }

    /// The frames to send now: from the earliest unsent entry onward, in
    /// order, as many as the send window leaves room for (later entries
    /// that were on the wire were refused too, or will be; the server
    /// deduplicates the rest). Nothing during a pause.
    pub(crate) fn transmit(&mut self) -> Vec<Bytes> {
        if self.is_paused() {
            return Vec::new();
        }
        let Some(first) = self.entries.iter().position(|e| e.unsent) else {
            return Vec::new();
        };
        let room = self.room();
        self.entries
            .iter_mut()
            .skip(first)
            .take(room)
            .map(|e| {
                e.unsent = false;
                e.frame.clone()
            })
            .collect()
    }

    /// A new connection: nothing is on its wire. The caller then sends
    /// what [`transmit`](Self::transmit) gives.
    pub(crate) fn mark_all_unsent(&mut self) {
        for entry in &mut self.entries {
            entry.unsent = true;
        }
    }

    /// Whether sends are held back now.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused_until.is_some()
    }

    /// Holds sends back until `until` (or later, if already paused
    /// longer), and marks the `refused` entry for resending. Returns true
    /// if this starts a pause, so the caller schedules the resend. A
    /// refusal of a send no longer here (answered since: a late answer
    /// from a connection replaced meanwhile) holds nothing back.
    pub(crate) fn pause(&mut self, until: tokio::time::Instant, refused: u64) -> bool {
        let Some(entry) = self.entries.iter_mut().find(|e| e.request_id == refused) else {
            return false;
        };
        entry.unsent = true;
        self.window = Some(1);
        match self.paused_until {
            Some(current) => {
                self.paused_until = Some(current.max(until));
                false
            }
            None => {
                self.paused_until = Some(until);
                true
            }
        }
    }

    /// Ends the pause if its time has come; otherwise returns when to
    /// check again.
    pub(crate) fn try_resume(
        &mut self,
        now: tokio::time::Instant,
    ) -> Result<(), tokio::time::Instant> {
        match self.paused_until {
            Some(until) if until > now => Err(until),
            _ => {
                self.paused_until = None;
                Ok(())
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether a send of `client_msg_id` to the conversation awaits its
    /// answer here.
    pub(crate) fn holds(&self, conversation_id: u64, client_msg_id: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.key.0 == conversation_id && e.key.1 == client_msg_id)
    }

    /// Fails every entry (the client is closing for good).
    pub(crate) fn fail_all(&mut self, error: &ClientError) {
        for mut entry in self.entries.drain(..) {
            if let Some(waiter) = entry.waiter.take() {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }
}

/// The refusal of a text longer than the server accepts: the one the
/// server itself would give.
pub(crate) fn too_long(text_len: usize, max_text_len: usize) -> ClientError {
    ClientError::Server {
        code: chat_protocol::ErrorCode::MessageTooLarge,
        message: format!("text is {text_len} bytes; the limit is {max_text_len}"),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> (u64, String) {
        (7, format!("m{n}"))
    }

    fn ack(seq: u64) -> proto::SendAck {
        proto::SendAck {
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn bounded_ordered_and_completed_once() {
        let mut outbox = Outbox::new(2);
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, _rx2) = oneshot::channel();
        let (tx3, _rx3) = oneshot::channel();
        outbox
            .push(1, key(1), (Bytes::from_static(b"a"), 1), tx1, true)
            .unwrap();
        outbox
            .push(2, key(2), (Bytes::from_static(b"b"), 1), tx2, true)
            .unwrap();
        assert_eq!(
            outbox.push(3, key(3), (Bytes::from_static(b"c"), 1), tx3, true),
            Err(ClientError::OutboxFull(2))
        );
        outbox.mark_all_unsent();
        assert_eq!(
            outbox.transmit(),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        assert!(outbox.complete(1, Ok(ack(7))));
        assert!(
            !outbox.complete(1, Ok(ack(7))),
            "a second answer finds nothing"
        );
        assert_eq!(rx1.try_recv().unwrap().unwrap().seq, 7);
        assert_eq!(outbox.len(), 1);
        assert!(outbox.holds(7, "m2"));
        assert!(!outbox.holds(7, "m1"), "answered: no longer held");
        assert!(!outbox.holds(8, "m2"), "another conversation's key");
    }

    /// An outbox of `capacity` with sends 1..=`n` on the wire, unanswered.
    fn holding(capacity: usize, n: u64) -> Outbox {
        let mut outbox = Outbox::new(capacity);
        for id in 1..=n {
            outbox
                .push(
                    id,
                    key(id),
                    (Bytes::from_static(b"x"), 1),
                    oneshot::channel().0,
                    true,
                )
                .unwrap();
        }
        outbox
    }

    #[test]
    fn a_pause_lasts_until_its_latest_deadline() {
        let mut outbox = holding(4, 3);
        let now = tokio::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        assert!(!outbox.is_paused());
        assert!(
            !outbox.pause(now + ms(100), 9),
            "a refusal of a send no longer here holds nothing back"
        );
        assert!(!outbox.is_paused());
        assert!(
            outbox.pause(now + ms(100), 1),
            "the first refusal starts a pause"
        );
        assert!(!outbox.pause(now + ms(300), 2), "later ones extend it");
        assert!(!outbox.pause(now + ms(200), 3), "never shorten it");
        assert_eq!(outbox.try_resume(now + ms(150)), Err(now + ms(300)));
        assert!(outbox.is_paused());
        assert_eq!(outbox.try_resume(now + ms(300)), Ok(()));
        assert!(!outbox.is_paused());
    }

    #[test]
    fn a_pause_ends_with_a_resend_from_the_earliest_refused_entry() {
        let mut outbox = Outbox::new(8);
        let mut waiters = Vec::new();
        for (id, frame) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            let (tx, rx) = oneshot::channel();
            waiters.push(rx);
            outbox
                .push(
                    id,
                    key(id),
                    (Bytes::from_static(frame.as_bytes()), 1),
                    tx,
                    true,
                )
                .unwrap();
        }
        let until = tokio::time::Instant::now();
        // "a" was accepted (its ack is on the way); "b" and "d" were
        // refused; "c" was refused too but its answer has not arrived.
        outbox.pause(until, 2);
        outbox.pause(until, 4);
        let (tx, rx) = oneshot::channel();
        waiters.push(rx);
        outbox
            .push(5, key(5), (Bytes::from_static(b"e"), 1), tx, false)
            .unwrap();
        assert_eq!(outbox.try_resume(until), Ok(()));
        let frames = |names: &[&'static str]| -> Vec<Bytes> {
            names
                .iter()
                .map(|f| Bytes::from_static(f.as_bytes()))
                .collect()
        };
        // A window of one, which "a" (and "c", until its refusal comes)
        // still fills.
        assert!(outbox.transmit().is_empty(), "the window is full");
        assert!(
            outbox.pause(until, 3),
            "c's refusal arrives after the pause: another one"
        );
        assert_eq!(outbox.try_resume(until), Ok(()));
        assert!(outbox.transmit().is_empty(), "a is still on the wire");
        assert!(
            !outbox
                .push(
                    6,
                    key(6),
                    (Bytes::from_static(b"f"), 1),
                    oneshot::channel().0,
                    true
                )
                .unwrap(),
            "a new send waits behind the unsent ones"
        );
        // a's ack doubles the window: from the first refused entry on, in
        // order; not the accepted one.
        assert!(outbox.complete(1, Ok(ack(1))));
        assert_eq!(outbox.transmit(), frames(&["b", "c"]));
        assert!(outbox.transmit().is_empty(), "sent once");
        // Four, as many as wait: the window opens.
        assert!(outbox.complete(2, Ok(ack(2))));
        assert_eq!(outbox.transmit(), frames(&["d", "e", "f"]));
        assert!(
            outbox
                .push(
                    7,
                    key(7),
                    (Bytes::from_static(b"g"), 1),
                    oneshot::channel().0,
                    true
                )
                .unwrap(),
            "open again: a new send goes at once"
        );
        outbox.mark_all_unsent();
        assert_eq!(
            outbox.transmit(),
            frames(&["c", "d", "e", "f", "g"]),
            "a new connection gets all"
        );
    }

    /// A backlog behind a refusal clears in about as many frames as it
    /// holds: resent whole after each pause, a bucket refilling one token
    /// at a time made it N²/2.
    #[test]
    fn a_backlog_behind_a_rate_limit_is_resent_a_window_at_a_time() {
        const N: u64 = 200;
        let mut outbox = holding(N as usize, N);
        // A server with one token a pause: each time, the first frame it
        // reads is accepted and the rest of what was sent refused.
        let now = tokio::time::Instant::now();
        let mut on_wire: VecDeque<u64> = (1..=N).collect();
        let mut frames_sent = N;
        while outbox.len() > 0 {
            let accepted = on_wire.pop_front().expect("something on the wire");
            for refused in on_wire.drain(..) {
                outbox.pause(now, refused);
            }
            assert!(outbox.complete(accepted, Ok(ack(accepted))));
            let _ = outbox.try_resume(now);
            let sent = outbox.transmit();
            frames_sent += sent.len() as u64;
            on_wire.extend(
                outbox
                    .entries
                    .iter()
                    .filter(|e| !e.unsent)
                    .map(|e| e.request_id),
            );
        }
        // 597 as written; 20,100 resent whole.
        assert!(frames_sent <= 4 * N, "{frames_sent} frames for {N} sends");
    }
    #[test]
    fn a_new_servers_lower_text_limit_fails_the_longer_sends_alone() {
        let mut outbox = Outbox::new(4);
        let mut waiters = Vec::new();
        for (id, len) in [(1, 10), (2, 2_000), (3, 1_000)] {
            let (tx, rx) = oneshot::channel();
            waiters.push(rx);
            outbox
                .push(id, key(id), (Bytes::from_static(b"f"), len), tx, true)
                .unwrap();
        }
        assert!(outbox.fail_longer_than(1_000));
        assert!(!outbox.fail_longer_than(1_000), "nothing more to fail");
        assert_eq!(outbox.len(), 2);
        assert!(outbox.holds(7, "m1") && outbox.holds(7, "m3"));
        let refused = waiters[1].try_recv().unwrap().unwrap_err();
        assert_eq!(
            refused.code(),
            Some(chat_protocol::ErrorCode::MessageTooLarge)
        );
        assert!(waiters[0].try_recv().is_err(), "still waiting");
        assert!(
            waiters[2].try_recv().is_err(),
            "at the limit: still waiting"
        );
    }
}
