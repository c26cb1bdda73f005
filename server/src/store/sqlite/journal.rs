//! The embedded store's journal: what makes a send durable between two
//! SQLite commits.
//!
//! Sends and watermark moves (the hot jobs) run inside a SQLite
//! transaction that stays open for up to [`super::SQLITE_COMMIT_INTERVAL`];
//! each batch of them is made durable by appending one record per write to
//! this file and syncing it (`fdatasync`) before anyone hears "done". A
//! SQLite commit (every interval, before answering any other job, and at
//! shutdown) makes the journal's content redundant: it records a new
//! generation in `written_through.journal_gen` in the same transaction, and
//! the journal starts over at offset 0 with that generation. Recovery (at
//! open, or after a rolled-back transaction) replays the records of the
//! committed generation: those of an older one are already in SQLite.
//!
//! The file is overwritten in place and never truncated, so once it has
//! grown to its working size a sync writes data blocks only, with no
//! change to the file's metadata for ext4 to journal.
//!
//! Record: `len: u32` (of the body), `crc32(body): u32`, then the body:
//! `generation: u64`, `kind: u8` and the fields, all little-endian. The
//! first record that is short, fails its checksum or belongs to another
//! generation ends the journal (a torn tail, zeros, or what an older
//! generation left beyond the current end).

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use bytes::{Buf, BufMut};

/// The journal's file name under the data directory.
pub(super) const FILE_NAME: &str = "chat.journal";

/// Zeros written once when the file is new, so the first syncs do not
/// grow it (a sync that grows a file also commits ext4's metadata journal).
const PREALLOCATE: u64 = 1 << 20;

/// Largest record body read back; a longer length is a torn or foreign
/// tail, not a record (a message is bounded far below this by the
/// protocol's limits).
const MAX_RECORD: usize = 4 << 20;

const HEADER: usize = 8;
const KIND_MESSAGE: u8 = 1;
const KIND_WATERMARK: u8 = 2;

/// One durable write, as replayed into SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record<'a> {
    /// A row of `messages`.
    Message {
        message_id: u64,
        conversation_id: u64,
        seq: u64,
        sender_id: u64,
        client_msg_id: Cow<'a, str>,
        message_type: i32,
        sent_at_ms: i64,
        body: Cow<'a, str>,
    },
    /// A row of `watermark_log`: a member's watermarks moved to
    /// (`delivered`, `seen`).
    Watermark {
        conversation_id: u64,
        user_id: u64,
        delivered: u64,
        seen: u64,
    },
}

/// The open journal file and the records of the batch being built.
pub(super) struct Journal {
    file: File,
    /// The same file opened `O_DIRECT | O_DSYNC`, where the file system
    /// takes it: a write is then on disk when it returns, one device write
    /// with no page-cache flush after it (about a third less CPU than a
    /// buffered write and `fdatasync` on this machine's virtio disk).
    direct: Option<File>,
    generation: u64,
    /// Where the next batch is written: the end of the current generation.
    end: u64,
    /// Encoded records not yet written.
    pending: Vec<u8>,
    /// With `direct`: the bytes of the last, partly written block (writes
    /// start at a block boundary, so they rewrite it).
    tail: Vec<u8>,
    /// With `direct`: room for one aligned write.
    scratch: Vec<u8>,
}

/// Alignment and size unit of `O_DIRECT` writes.
const BLOCK: usize = 4096;

impl Journal {
    /// Opens (creating if needed) the journal under `dir`. Its records are
    /// read with [`records`](Self::records); nothing is appended until
    /// [`start_generation`](Self::start_generation).
    pub(super) fn open(dir: &Path) -> io::Result<Journal> {
        Self::open_with(dir, true)
    }

    /// [`open`](Self::open), trying `O_DIRECT` only if `direct` (tests
    /// run both ways: where the file system refuses it, it is not used).
    fn open_with(dir: &Path, direct: bool) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE_NAME))?;
        if file.metadata()?.len() < PREALLOCATE {
            file.write_all_at(&vec![0; PREALLOCATE as usize], 0)?;
            file.sync_all()?;
        }
        let mut journal = Journal {
            file,
            direct: direct.then(|| open_direct(&dir.join(FILE_NAME))).flatten(),
            generation: 0,
            end: 0,
            pending: Vec::new(),
            tail: Vec::new(),
            scratch: Vec::new(),
        };
        // A file system may open a file O_DIRECT and still refuse the
        // writes: probe by writing the first block back as it is.
        if journal.direct.is_some() && journal.rewrite_first_block().is_err() {
            journal.direct = None;
        }
        Ok(journal)
    }

    /// Whether writes go straight to the device (`O_DIRECT | O_DSYNC`).
    pub(super) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The records of `generation`, in the order they were written.
    pub(super) fn records(&self, generation: u64) -> io::Result<Vec<Record<'static>>> {
        let len = self.file.metadata()?.len();
        let mut bytes = vec![0; len as usize];
        self.file.read_exact_at(&mut bytes, 0)?;
        let mut records = Vec::new();
        let mut rest = &bytes[..];
        while let Some((record, len)) = decode(rest, generation) {
            records.push(record);
            rest = &rest[len..];
        }
        Ok(records)
    }

    /// Starts over at the beginning of the file with `generation`, the one
    /// just committed to SQLite; what was pending is dropped.
    pub(super) fn start_generation(&mut self, generation: u64) {
        self.generation = generation;
        self.end = 0;
        self.pending.clear();
        self.tail.clear();
    }

    /// Adds `record` to the batch being built.
    pub(super) fn push(&mut self, record: &Record<'_>) {
        let start = self.pending.len();
        self.pending.put_u32_le(0);
        self.pending.put_u32_le(0);
        self.pending.put_u64_le(self.generation);
        match record {
            Record::Message {
                message_id,
                conversation_id,
                seq,
                sender_id,
                client_msg_id,
                message_type,
                sent_at_ms,
                body,
            } => {
                self.pending.put_u8(KIND_MESSAGE);
                self.pending.put_u64_le(*message_id);
                self.pending.put_u64_le(*conversation_id);
                self.pending.put_u64_le(*seq);
                self.pending.put_u64_le(*sender_id);
                self.pending.put_i32_le(*message_type);
                self.pending.put_i64_le(*sent_at_ms);
                put_str(&mut self.pending, client_msg_id);
                put_str(&mut self.pending, body);
            }
            Record::Watermark {
                conversation_id,
                user_id,
                delivered,
                seen,
            } => {
                self.pending.put_u8(KIND_WATERMARK);
                self.pending.put_u64_le(*conversation_id);
                self.pending.put_u64_le(*user_id);
                self.pending.put_u64_le(*delivered);
                self.pending.put_u64_le(*seen);
            }
        }
        let body = &self.pending[start + HEADER..];
        let (len, crc) = (body.len() as u32, crc32fast::hash(body));
        self.pending[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.pending[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    }

    /// The generation records are written with.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes of the current generation written so far.
    pub(super) fn len(&self) -> u64 {
        self.end
    }

    /// Writes the pending records after the current generation's end and
    /// waits until they are on disk. On error the records may or may not
    /// be there: the caller rolls back and recovers from what is.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let written = match self.direct {
            Some(_) => self.write_direct(&pending),
            None => self
                .file
                .write_all_at(&pending, self.end)
                .and_then(|()| self.file.sync_data()),
        };
        self.pending = pending;
        written?;
        self.end += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Writes the first block back through the `O_DIRECT` handle.
    fn rewrite_first_block(&mut self) -> io::Result<()> {
        let Some(direct) = &self.direct else {
            return Err(io::Error::other("not opened O_DIRECT"));
        };
        self.scratch.clear();
        self.scratch.resize(2 * BLOCK, 0);
        let at = self.scratch.as_ptr().align_offset(BLOCK);
        let block = &mut self.scratch[at..at + BLOCK];
        self.file.read_exact_at(block, 0)?;
        direct.write_all_at(block, 0)
    }

    /// Writes `bytes` at the end through the `O_DIRECT` handle: from the
    /// start of the block the end is in (the tail again, then `bytes`),
    /// zero-padded to whole blocks. Keeps the new partial block as the tail;
    /// does not move the end.
    fn write_direct(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(direct) = &self.direct else {
            return Err(io::Error::other("not opened O_DIRECT"));
        };
        let block_start = self.end - self.tail.len() as u64;
        let len = self.tail.len() + bytes.len();
        let padded = len.next_multiple_of(BLOCK);
        self.scratch.clear();
        self.scratch.resize(padded + BLOCK, 0);
        let at = self.scratch.as_ptr().align_offset(BLOCK);
        let buf = &mut self.scratch[at..at + padded];
        buf[..self.tail.len()].copy_from_slice(&self.tail);
        buf[self.tail.len()..len].copy_from_slice(bytes);
        direct.write_all_at(buf, block_start)?;
        let whole = len / BLOCK * BLOCK;
        self.tail.clear();
        self.tail.extend_from_slice(&buf[whole..len]);
        Ok(())
    }

    /// Drops the pending records (their batch rolled back).
    pub(super) fn discard_pending(&mut self) {
        self.pending.clear();
    }
}

/// `path` opened for `O_DIRECT | O_DSYNC` writes, if the file system
/// allows it (tmpfs does not).
fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
        .ok()
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.put_u32_le(s.len() as u32);
    buf.put_slice(s.as_bytes());
}

/// The record at the start of `bytes` and its encoded length, if it is a
/// whole, intact record of `generation`.
fn decode(bytes: &[u8], generation: u64) -> Option<(Record<'static>, usize)> {
    let mut header = bytes.get(..HEADER)?;
    let (len, crc) = (header.get_u32_le() as usize, header.get_u32_le());
    if len > MAX_RECORD {
        return None;
    }
    let body = bytes.get(HEADER..HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let mut b = Fields(body);
    if b.u64()? != generation {
        return None;
    }
    let record = match b.u8()? {
        KIND_MESSAGE => Record::Message {
            message_id: b.u64()?,
            conversation_id: b.u64()?,
            seq: b.u64()?,
            sender_id: b.u64()?,
            message_type: b.i32()?,
            sent_at_ms: b.i64()?,
            client_msg_id: Cow::Owned(b.str()?),
            body: Cow::Owned(b.str()?),
        },
        KIND_WATERMARK => Record::Watermark {
            conversation_id: b.u64()?,
            user_id: b.u64()?,
            delivered: b.u64()?,
            seen: b.u64()?,
        },
        _ => return None,
    };
    Some((record, HEADER + len))
}

/// Bounds-checked little-endian reads from a record body.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        (self.0.len() >= n).then(|| {
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            head
        })
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|mut b| b.get_u64_le())
    }

    fn i64(&mut self) -> Option<i64> {
        self.take(8).map(|mut b| b.get_i64_le())
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|mut b| b.get_i32_le())
    }

    fn str(&mut self) -> Option<String> {
        let len = self.take(4).map(|mut b| b.get_u32_le())? as usize;
        self.take(len)
            .and_then(|b| String::from_utf8(b.to_vec()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64, body: &str) -> Record<'static> {
        Record::Message {
            message_id: id,
            conversation_id: 7,
            seq: id,
            sender_id: 3,
            client_msg_id: format!("k{id}").into(),
            message_type: 1,
            sent_at_ms: 1_700_000_000_000 + id as i64,
            body: body.to_owned().into(),
        }
    }

    fn watermark(seen: u64) -> Record<'static> {
        Record::Watermark {
            conversation_id: 7,
            user_id: 4,
            delivered: seen + 1,
            seen,
        }
    }

    #[test]
    fn synced_records_are_read_back_in_order_and_pending_ones_are_not() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open_with(dir.path(), direct).unwrap();
            journal.start_generation(5);
            let written = [message(1, "héllo"), watermark(1), message(2, "")];
            for r in &written {
                journal.push(r);
            }
            journal.sync().unwrap();
            journal.push(&message(3, "never synced"));
            assert_eq!(journal.records(5).unwrap(), written);
            let reopened = Journal::open_with(dir.path(), direct).unwrap();
            assert_eq!(reopened.records(5).unwrap(), written);
            assert_eq!(reopened.records(4).unwrap(), [], "another generation");
        }
    }

    #[test]
    fn a_new_generation_hides_the_longer_older_one_it_overwrites() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open_with(dir.path(), direct).unwrap();
            journal.start_generation(1);
            for id in 1..=10 {
                journal.push(&message(id, "old"));
            }
            journal.sync().unwrap();
            journal.start_generation(2);
            journal.push(&message(11, "new"));
            journal.sync().unwrap();
            assert_eq!(journal.records(2).unwrap(), [message(11, "new")]);
            // Generation 1 starts where generation 2 overwrote it: not a record
            // of generation 1 any more.
            assert_eq!(journal.records(1).unwrap(), []);
        }
    }

    #[test]
    fn a_torn_or_corrupt_record_ends_the_journal() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open_with(dir.path(), direct).unwrap();
            journal.start_generation(9);
            journal.push(&message(1, "kept"));
            journal.sync().unwrap();
            let second_at = journal.len();
            journal.push(&message(2, "torn"));
            journal.push(&message(3, "after the tear"));
            journal.sync().unwrap();
            // Flip one byte of the second record's body.
            let file = OpenOptions::new()
                .write(true)
                .open(dir.path().join(FILE_NAME))
                .unwrap();
            file.write_all_at(b"X", second_at + HEADER as u64 + 20)
                .unwrap();
            assert_eq!(journal.records(9).unwrap(), [message(1, "kept")]);
            // A length beyond any record.
            file.write_all_at(&u32::MAX.to_le_bytes(), 0).unwrap();
            assert_eq!(journal.records(9).unwrap(), []);
        }
    }

    /// Batches that end inside a block, cross blocks, and start a new
    /// generation read back whole, whichever way the file is written.
    #[test]
    fn batches_of_every_size_read_back_across_blocks() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open_with(dir.path(), direct).unwrap();
            journal.start_generation(3);
            let mut written = Vec::new();
            for id in 0..200u64 {
                let r = message(id, &"x".repeat((id as usize * 37) % 5000));
                journal.push(&r);
                written.push(r);
                if id % 7 == 0 {
                    journal.sync().unwrap();
                }
            }
            journal.sync().unwrap();
            let reopened = Journal::open_with(dir.path(), direct).unwrap();
            assert_eq!(reopened.records(3).unwrap(), written);
            journal.start_generation(4);
            journal.push(&watermark(1));
            journal.sync().unwrap();
            assert_eq!(journal.records(4).unwrap(), [watermark(1)]);
        }
    }

    #[test]
    fn the_file_is_preallocated_and_not_grown_by_small_batches() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open_with(dir.path(), direct).unwrap();
            journal.start_generation(1);
            for id in 0..100 {
                journal.push(&message(id, "hello"));
                journal.sync().unwrap();
            }
            let len = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
            assert_eq!(len, PREALLOCATE);
            assert!(journal.len() > 0 && journal.len() < PREALLOCATE);
        }
    }
}
