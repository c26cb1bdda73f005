//! Passwords and session tokens.
//!
//! * Passwords are hashed with Argon2id (OWASP's minimum parameters: 19 MiB,
//!   2 passes, 1 lane) into a PHC string with its own random salt. Hashing
//!   takes tens of milliseconds of CPU on purpose, so it runs on tokio's
//!   blocking pool, never on a runtime thread.
//! * A session token is 32 random bytes from the OS, given to the client as
//!   64 hex characters. The server stores only its SHA-256: a leaked
//!   database does not leak usable tokens, and a fast hash is enough
//!   because the token has 256 bits of entropy (no dictionary to try).
//!
//! Neither passwords nor tokens are ever logged.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chat_protocol::limits::{PASSWORD_LEN, USERNAME_LEN};
use sha2::{Digest, Sha256};

/// Failed password checks, counted twice: per account and source address
/// (`per_source`, the tight budget) and per account from every source
/// together (`per_account`, looser). Guessing a password cannot go faster
/// than `per_account` per `window` from any number of connections and
/// addresses (each attempt also costs an Argon2 hash of server CPU), while
/// one attacker's address, having spent its own budget, no longer locks
/// the owner out from theirs: that takes guesses from `per_account /
/// per_source` addresses. (The owner's devices resume with their session
/// tokens, which no throttle touches.) A source is an IPv4 address or an
/// IPv6 /64, the block one host is usually given.
///
/// Per node, in memory: a cluster multiplies the budgets by its node
/// count, which still turns millions of guesses into a handful. One lock:
/// a login is rare next to its Argon2 hash, and both records of an attempt
/// change together.
pub struct LoginThrottle {
    state: std::sync::Mutex<ThrottleState>,
    per_source: u32,
    per_account: u32,
    window: std::time::Duration,
}

struct ThrottleState {
    records: std::collections::HashMap<ThrottleKey, Record>,
    /// Records at which the next sweep runs: twice what the last one
    /// kept, so records still inside their window are not scanned again
    /// at every login.
    sweep_at: usize,
}

/// An account's record from one source, or (`source: None`) from all.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ThrottleKey {
    user: u64,
    source: Option<std::net::IpAddr>,
}

/// Wrong passwords in the current window, and password checks still
/// running (each may yet be one more).
struct Record {
    failures: u32,
    running: u32,
    since: std::time::Instant,
}

impl Record {
    fn new() -> Self {
        Record {
            failures: 0,
            running: 0,
            since: std::time::Instant::now(),
        }
    }

    /// Starts a new window once `window` has passed since this one began.
    fn roll(&mut self, window: std::time::Duration) {
        if self.since.elapsed() >= window {
            self.failures = 0;
            self.since = std::time::Instant::now();
        }
    }

    /// How long a new check must wait under `max`, if it must.
    fn wait(&self, max: u32, window: std::time::Duration) -> Option<std::time::Duration> {
        if self.failures >= max {
            Some(window.saturating_sub(self.since.elapsed()))
        } else if self.failures + self.running >= max {
            Some(RUNNING_WAIT)
        } else {
            None
        }
    }
}

/// Entries kept before stale ones are swept.
const THROTTLE_SWEEP_AT: usize = 100_000;

/// The retry-after when the budget is taken by checks still running: one
/// Argon2 hash, with room to queue for a hasher.
const RUNNING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The source a login is counted under: the IPv4 address (also when it
/// comes mapped into IPv6), or the IPv6 address's /64.
pub fn login_source(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            std::net::IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl LoginThrottle {
    /// Allows `per_source` wrong passwords per account and source, and
    /// `per_account` per account from all sources, per `window`.
    pub fn new(per_source: u32, per_account: u32, window: std::time::Duration) -> Self {
        LoginThrottle {
            state: std::sync::Mutex::new(ThrottleState {
                records: std::collections::HashMap::new(),
                sweep_at: THROTTLE_SWEEP_AT,
            }),
            per_source,
            per_account,
            window,
        }
    }

    fn keys(user: u64, source: std::net::IpAddr) -> [ThrottleKey; 2] {
        [
            ThrottleKey { user, source: None },
            ThrottleKey {
                user,
                source: Some(login_source(source)),
            },
        ]
    }

    /// Starts a password check for `user` from `source`, or `Err(wait)`
    /// while either budget is spent, counting the checks still running as
    /// wrong: a burst of guesses from many connections at once gets no
    /// more tries than the same guesses one after another.
    pub fn begin(
        &self,
        user: u64,
        source: std::net::IpAddr,
    ) -> Result<Attempt<'_>, std::time::Duration> {
        let window = self.window;
        let mut state = self.state.lock().expect("throttle lock");
        if state.records.len() >= state.sweep_at {
            state
                .records
                .retain(|_, r| r.running > 0 || (r.failures > 0 && r.since.elapsed() < window));
            state.sweep_at = (2 * state.records.len()).max(THROTTLE_SWEEP_AT);
        }
        let keys = Self::keys(user, source);
        let mut wait = None;
        for (key, max) in keys.iter().zip([self.per_account, self.per_source]) {
            // Looked at, not made: a refused attempt costs no hash, so it
            // must not cost the node a record either (an attacker with
            // many addresses would add one per address at handshake
            // speed).
            if let Some(record) = state.records.get_mut(key) {
                record.roll(window);
                wait = wait.max(record.wait(max, window));
            }
        }
        if let Some(wait) = wait {
            return Err(wait);
        }
        for key in &keys {
            state
                .records
                .entry(*key)
                .or_insert_with(Record::new)
                .running += 1;
        }
        Ok(Attempt {
            throttle: self,
            keys,
            open: true,
        })
    }

    /// Ends a check: a wrong password counts in both records; a right one
    /// forgives its source's wrong passwords, but not the account's from
    /// elsewhere, nor the checks still running (forgiving those used to
    /// let guesses in flight during the owner's login fail uncounted).
    fn end(&self, keys: &[ThrottleKey; 2], verdict: Verdict) {
        let window = self.window;
        let mut state = self.state.lock().expect("throttle lock");
        for key in keys {
            let Some(record) = state.records.get_mut(key) else {
                continue;
            };
            record.running = record.running.saturating_sub(1);
            match verdict {
                Verdict::Wrong => {
                    record.roll(window);
                    record.failures += 1;
                }
                Verdict::Right if key.source.is_some() => {
                    record.failures = 0;
                    record.since = std::time::Instant::now();
                }
                Verdict::Right | Verdict::NotRun => {}
            }
            // A record that holds nothing is the same as none.
            if record.running == 0 && record.failures == 0 {
                state.records.remove(key);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Verdict {
    Wrong,
    Right,
    /// The check could not run: its try is given back.
    NotRun,
}

/// A password check under way (see [`LoginThrottle::begin`]). Dropped
/// without a verdict (the check could not run), it gives its try back.
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    keys: [ThrottleKey; 2],
    open: bool,
}

impl Attempt<'_> {
    /// The password was wrong.
    pub fn failed(mut self) {
        self.open = false;
        self.throttle.end(&self.keys, Verdict::Wrong);
    }

    /// The password was right.
    pub fn succeeded(mut self) {
        self.open = false;
        self.throttle.end(&self.keys, Verdict::Right);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.open {
            self.throttle.end(&self.keys, Verdict::NotRun);
        }
    }
}

/// The password hashers: one Argon2 hash per core at a time (each holds
/// 19 MiB), and a bounded queue in front of them. A flood of logins or
/// registrations then gets a prompt "busy, retry later" beyond the queue
/// instead of lining every request up behind it, where honest users would
/// wait for seconds and connections would pile up.
///
/// Each source (an IPv4 address, an IPv6 /64: [`login_source`]) has at most
/// `per_source` requests in that queue or hashing at once; its others wait
/// for one of its own to end before they join. Without it one host, with
/// its share of unauthenticated connections and their attempts, could keep
/// the whole queue full and every other login answered SERVER_BUSY; now it
/// only slows itself down (a bulk set-up from one address still goes
/// through, `per_source` at a time).
pub struct Hashers {
    permits: tokio::sync::Semaphore,
    queued: std::sync::atomic::AtomicUsize,
    max_queued: usize,
    /// 0: no per-source share.
    per_source: usize,
    /// The turns of each source with a request waiting or hashing; an
    /// entry goes with its last request.
    sources: dashmap::DashMap<std::net::IpAddr, std::sync::Arc<tokio::sync::Semaphore>>,
}

/// Why no hasher was given.
#[derive(Debug, PartialEq, Eq)]
pub enum HashersError {
    /// Every hasher is busy and the queue is full.
    Busy,
    /// The server is shutting down.
    Closed,
}

/// A hasher, held while one password is hashed.
pub struct HashPermit<'a> {
    _hasher: tokio::sync::SemaphorePermit<'a>,
    /// Let go after the hasher (fields drop in order), so the source's next
    /// request finds it free.
    _turn: Option<SourceTurn<'a>>,
}

/// One of a source's `per_source` places, held from before its request
/// joins the queue until its hash ends (or its wait is given up).
struct SourceTurn<'a> {
    hashers: &'a Hashers,
    source: std::net::IpAddr,
    turns: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for SourceTurn<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        drop(self.turns.take());
        // Under the map's lock, as every clone is taken: nobody else holds
        // or waits for a turn of this source, so its entry can go.
        self.hashers.sources.remove_if(&self.source, |_, turns| {
            std::sync::Arc::strong_count(turns) == 1
        });
    }
}

impl Hashers {
    /// `hashers` at once, up to `max_queued` requests waiting for one, at
    /// most `per_source` of them (0: any number) from one source.
    pub fn new(hashers: usize, max_queued: usize, per_source: usize) -> Self {
        Hashers {
            permits: tokio::sync::Semaphore::new(hashers.max(1)),
            queued: std::sync::atomic::AtomicUsize::new(0),
            max_queued,
            per_source,
            sources: dashmap::DashMap::new(),
        }
    }

    /// A hasher for a request from `address`: first one of its source's
    /// places (waiting for one if they are all taken), then a hasher,
    /// waiting in the queue if all are busy and it has room.
    pub async fn acquire(&self, address: std::net::IpAddr) -> Result<HashPermit<'_>, HashersError> {
        let turn = if self.per_source == 0 {
            None
        } else {
            let source = login_source(address);
            let turns = self
                .sources
                .entry(source)
                .or_insert_with(|| {
                    std::sync::Arc::new(tokio::sync::Semaphore::new(self.per_source))
                })
                .clone();
            let mut turn = SourceTurn {
                hashers: self,
                source,
                turns: Some(turns.clone()),
                held: None,
            };
            turn.held = Some(
                turns
                    .acquire_owned()
                    .await
                    .map_err(|_| HashersError::Closed)?,
            );
            Some(turn)
        };
        Ok(HashPermit {
            _hasher: self.hasher().await?,
            _turn: turn,
        })
    }

    /// A hasher, waiting in the queue if all are busy and it has room.
    async fn hasher(&self) -> Result<tokio::sync::SemaphorePermit<'_>, HashersError> {
        use std::sync::atomic::Ordering;
        use tokio::sync::TryAcquireError;
        match self.permits.try_acquire() {
            Ok(permit) => return Ok(permit),
            Err(TryAcquireError::Closed) => return Err(HashersError::Closed),
            Err(TryAcquireError::NoPermits) => {}
        }
        /// Leaves the queue however the wait ends (also when the request
        /// is dropped because its connection closed).
        struct InQueue<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for InQueue<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let ahead = self.queued.fetch_add(1, Ordering::Relaxed);
        let _in_queue = InQueue(&self.queued);
        if ahead >= self.max_queued {
            return Err(HashersError::Busy);
        }
        self.permits
            .acquire()
            .await
            .map_err(|_| HashersError::Closed)
    }

    /// Sources with a request waiting or hashing (for tests).
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

/// Bytes of randomness in a session token.
const TOKEN_BYTES: usize = 32;

/// Why credentials were refused before touching the store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    /// The user name breaks the naming rules.
    #[error("username must be {min}-{max} characters of a-z, 0-9, '_', '.', '-'", min = USERNAME_LEN.start(), max = USERNAME_LEN.end())]
    BadUsername,
    /// A new user name whose punctuation would make it easy to take for
    /// another (`alice.` for `alice`, `a..b` for `a.b`).
    #[error(
        "username must start and end with a letter or digit, with no two of '_', '.', '-' in a row"
    )]
    LooseUsername,
    /// The password is too short or too long.
    #[error("password must be {min}-{max} bytes", min = PASSWORD_LEN.start(), max = PASSWORD_LEN.end())]
    BadPassword,
}

/// User names are case-insensitive: this returns the canonical lower-case
/// form, or an error if the name is not allowed.
pub fn canonical_username(name: &str) -> Result<String, CredentialError> {
    let ok_len = USERNAME_LEN.contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok_len && ok_chars {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(CredentialError::BadUsername)
    }
}

/// The canonical form of a name a new account asks for: the rules of
/// [`canonical_username`], and punctuation only between letters or digits,
/// one mark at a time, so that no new name differs from another by a
/// trailing dot or a doubled dash. (Names are still looked up by
/// [`canonical_username`], so accounts made before this rule keep
/// working.)
pub fn new_username(name: &str) -> Result<String, CredentialError> {
    let name = canonical_username(name)?;
    let bytes = name.as_bytes();
    let mark = |b: &u8| !b.is_ascii_alphanumeric();
    let loose = bytes.first().is_some_and(mark)
        || bytes.last().is_some_and(mark)
        || bytes
            .windows(2)
            .any(|pair| mark(&pair[0]) && mark(&pair[1]));
    if loose {
        return Err(CredentialError::LooseUsername);
    }
    Ok(name)
}

/// Checks the password length rules.
pub fn check_password(password: &str) -> Result<(), CredentialError> {
    if PASSWORD_LEN.contains(&password.len()) {
        Ok(())
    } else {
        Err(CredentialError::BadPassword)
    }
}

fn hasher() -> Argon2<'static> {
    // Params::default() is OWASP's Argon2id recommendation (m=19456 KiB,
    // t=2, p=1). Spelled out so a dependency upgrade cannot weaken it
    // silently.
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string (blocking, CPU heavy).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a stored PHC string (blocking, CPU heavy).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A fresh random token (hex) and the hash to store.
pub fn new_token() -> (String, [u8; 32]) {
    let mut bytes = [0u8; TOKEN_BYTES];
    OsRng.fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let hash = token_hash(&token);
    (token, hash)
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Length of a session's id ([`session_id`]).
pub const SESSION_ID_LEN: usize = 16;

/// What names a session to its user's devices (ListSessions,
/// RevokeSession): the first half of its token's hash, from which neither
/// the token nor its stored hash can be had.
pub fn session_id(token_hash: &[u8; 32]) -> &[u8] {
    &token_hash[..SESSION_ID_LEN]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert_eq!(canonical_username("Alice_1.x-y").unwrap(), "alice_1.x-y");
        for bad in ["ab", "", "has space", "ünï", &"a".repeat(33), "semi;colon"] {
            assert_eq!(
                canonical_username(bad),
                Err(CredentialError::BadUsername),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn new_usernames_keep_punctuation_between_letters() {
        assert_eq!(new_username("Alice_1.x-y").unwrap(), "alice_1.x-y");
        assert_eq!(new_username("a-b").unwrap(), "a-b");
        for loose in [
            "alice.", ".alice", "_bob", "bob-", "a..b", "a._b", "a-_b", "...",
        ] {
            assert_eq!(
                new_username(loose),
                Err(CredentialError::LooseUsername),
                "{loose:?}"
            );
            if loose.len() >= 3 {
                assert!(canonical_username(loose).is_ok(), "still found: {loose:?}");
            }
        }
        assert_eq!(new_username("ab"), Err(CredentialError::BadUsername));
    }

    #[test]
    fn passwords() {
        assert!(check_password("12345678").is_ok());
        assert_eq!(check_password("1234567"), Err(CredentialError::BadPassword));
        assert_eq!(
            check_password(&"p".repeat(129)),
            Err(CredentialError::BadPassword)
        );
    }

    #[test]
    fn hash_and_verify() {
        let phc = hash_password("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        assert!(verify_password("correct horse battery", &phc));
        assert!(!verify_password("wrong horse battery", &phc));
        assert!(!verify_password(
            "correct horse battery",
            "not a phc string"
        ));
        // Salted: the same password hashes differently.
        assert_ne!(phc, hash_password("correct horse battery").unwrap());
    }

    const HOME: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn ip(text: &str) -> std::net::IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn login_throttle_locks_an_account_after_repeated_failures() {
        let window = std::time::Duration::from_secs(60);
        let throttle = LoginThrottle::new(3, 100, window);
        for _ in 0..2 {
            throttle.begin(7, HOME).unwrap().failed();
            assert!(throttle.begin(7, HOME).is_ok());
        }
        throttle.begin(7, HOME).unwrap().failed();
        let wait = throttle.begin(7, HOME).err().unwrap();
        assert!(wait > window / 2 && wait <= window, "{wait:?}");
        assert!(
            throttle.begin(8, HOME).is_ok(),
            "other accounts are unaffected"
        );
        // A right password clears the source's record (the attempt came
        // before the lockout).
        let throttle = LoginThrottle::new(3, 100, window);
        let early = throttle.begin(7, HOME).unwrap();
        throttle.begin(7, HOME).unwrap().failed();
        throttle.begin(7, HOME).unwrap().failed();
        early.succeeded();
        assert!(throttle.begin(7, HOME).is_ok());
        // A window that has passed starts over.
        let short = LoginThrottle::new(1, 100, std::time::Duration::from_millis(1));
        short.begin(1, HOME).unwrap().failed();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(short.begin(1, HOME).is_ok());
    }

    #[test]
    fn one_source_spending_its_budget_does_not_lock_out_another() {
        let window = std::time::Duration::from_secs(60);
        let throttle = LoginThrottle::new(3, 10, window);
        for _ in 0..3 {
            throttle.begin(7, ip("203.0.113.9")).unwrap().failed();
        }
        assert!(throttle.begin(7, ip("203.0.113.9")).is_err());
        // The same host over IPv6-mapped IPv4 is the same source, and so is
        // another address in the same IPv6 /64.
        assert!(throttle.begin(7, ip("::ffff:203.0.113.9")).is_err());
        for _ in 0..3 {
            throttle.begin(7, ip("2001:db8:1:2::1")).unwrap().failed();
        }
        assert!(throttle.begin(7, ip("2001:db8:1:2:ffff::5")).is_err());
        // The owner, elsewhere, still gets in; their success does not
        // forgive the account's wrong passwords from other sources.
        throttle.begin(7, HOME).unwrap().succeeded();
        assert!(throttle.begin(7, ip("203.0.113.9")).is_err());
        // Guesses from enough sources spend the account's budget (10):
        // then every source waits for the window, the owner's too.
        throttle.begin(7, ip("2001:db8:1:3::1")).unwrap().failed();
        throttle.begin(7, ip("2001:db8:1:3::1")).unwrap().failed();
        assert!(throttle.begin(7, HOME).is_ok());
        throttle.begin(7, ip("2001:db8:1:4::1")).unwrap().failed();
        assert!(throttle.begin(7, ip("2001:db8:1:4::1")).is_ok());
        let wait = throttle.begin(7, ip("2001:db8:1:5::1")).err();
        assert!(
            wait.is_none(),
            "9 wrong so far, after the attempts given back: {wait:?}"
        );
        throttle.begin(7, ip("2001:db8:1:5::1")).unwrap().failed();
        let wait = throttle.begin(7, HOME).err().unwrap();
        assert!(wait > window / 2 && wait <= window, "{wait:?}");
        assert!(
            throttle.begin(8, HOME).is_ok(),
            "other accounts are unaffected"
        );
    }

    #[test]
    fn refused_attempts_and_finished_checks_keep_no_records() {
        let throttle = LoginThrottle::new(3, 3, std::time::Duration::from_secs(60));
        let records = |t: &LoginThrottle| t.state.lock().unwrap().records.len();
        // Checks that end right, or never run, leave nothing behind.
        throttle.begin(7, HOME).unwrap().succeeded();
        drop(throttle.begin(7, HOME).unwrap());
        assert_eq!(records(&throttle), 0);
        // Once the account is locked, guesses from new sources (which
        // cost no hash) add no records.
        for _ in 0..3 {
            throttle.begin(7, HOME).unwrap().failed();
        }
        assert_eq!(records(&throttle), 2);
        for i in 0..1_000u32 {
            let source = std::net::IpAddr::V4((0x0a00_0000 + i).into());
            assert!(throttle.begin(7, source).is_err());
        }
        assert_eq!(records(&throttle), 2);
    }

    #[test]
    fn login_sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(login_source(ip("198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(login_source(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(
            login_source(ip("2001:db8:a:b:c:d:e:f")),
            ip("2001:db8:a:b::")
        );
        assert_ne!(
            login_source(ip("2001:db8:a:b::1")),
            login_source(ip("2001:db8:a:c::1"))
        );
    }

    #[test]
    fn records_inside_their_window_are_not_swept_at_every_login() {
        let state = |t: &LoginThrottle| {
            let s = t.state.lock().unwrap();
            (s.records.len(), s.sweep_at)
        };
        let throttle = LoginThrottle::new(3, 100, std::time::Duration::from_secs(60));
        // Two records per account: its own and its source's.
        let accounts = THROTTLE_SWEEP_AT as u64 / 2;
        for user in 0..accounts {
            throttle.begin(user, HOME).unwrap().failed();
        }
        // The sweep at the limit kept them all (in their window) and moved
        // the next one to twice as many.
        throttle.begin(u64::MAX, HOME).unwrap().failed();
        assert_eq!(
            state(&throttle),
            (THROTTLE_SWEEP_AT + 2, 2 * THROTTLE_SWEEP_AT)
        );
        // Expired records are dropped by the next sweep all the same.
        let short = LoginThrottle::new(3, 100, std::time::Duration::from_millis(1));
        for user in 0..accounts {
            short.begin(user, HOME).unwrap().failed();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        short.begin(u64::MAX, HOME).unwrap().failed();
        assert_eq!(state(&short), (2, THROTTLE_SWEEP_AT));
    }

    #[test]
    fn guesses_in_flight_during_the_owners_login_still_count() {
        let throttle = LoginThrottle::new(3, 100, std::time::Duration::from_secs(60));
        let owner = throttle.begin(7, HOME).unwrap();
        let guesses: Vec<_> = (0..2).map(|_| throttle.begin(7, HOME).unwrap()).collect();
        owner.succeeded();
        for guess in guesses {
            guess.failed();
        }
        // Both wrong guesses counted: one more try, then the lock.
        throttle.begin(7, HOME).unwrap().failed();
        assert!(throttle.begin(7, HOME).is_err());
    }

    #[test]
    fn checks_still_running_count_against_the_budget() {
        for (per_source, per_account) in [(3, 100), (100, 3)] {
            let throttle =
                LoginThrottle::new(per_source, per_account, std::time::Duration::from_secs(60));
            let running: Vec<_> = (0..3).map(|_| throttle.begin(7, HOME).unwrap()).collect();
            assert_eq!(throttle.begin(7, HOME).err(), Some(RUNNING_WAIT));
            // A check that could not run gives its try back.
            let mut running = running.into_iter();
            drop(running.next());
            let again = throttle.begin(7, HOME).unwrap();
            for attempt in running.chain([again]) {
                attempt.failed();
            }
            let wait = throttle.begin(7, HOME).err().unwrap();
            assert!(wait > RUNNING_WAIT, "locked for the window: {wait:?}");
        }
    }

    #[tokio::test]
    async fn hashers_queue_up_to_their_bound_then_refuse() {
        let hashers = std::sync::Arc::new(Hashers::new(1, 1, 0));
        let running = hashers.acquire(HOME).await.unwrap();
        // One waits in the queue...
        let waiting = {
            let hashers = hashers.clone();
            tokio::spawn(async move { hashers.acquire(HOME).await.map(drop) })
        };
        while hashers.queued.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // ...the next is refused at once.
        assert_eq!(hashers.acquire(HOME).await.err(), Some(HashersError::Busy));
        drop(running);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        // The refused and the served request both left the queue.
        assert_eq!(hashers.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(hashers.acquire(HOME).await.is_ok());
    }

    #[tokio::test]
    async fn one_source_cannot_fill_the_queue() {
        // One hasher, a queue of 4, two places per source.
        let hashers = std::sync::Arc::new(Hashers::new(1, 4, 2));
        let flooder: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        let running = hashers.acquire(flooder).await.unwrap();
        // The flooder's next joins the queue; the rest of its requests wait
        // for its own places, outside the queue.
        let mut flood = Vec::new();
        for _ in 0..6 {
            let hashers = hashers.clone();
            flood.push(tokio::spawn(async move {
                hashers.acquire(flooder).await.map(drop)
            }));
        }
        while hashers.queued.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(hashers.queued.load(std::sync::atomic::Ordering::Relaxed), 1);
        // So another source still finds room in the queue, where without
        // the share it would have found it full and been refused.
        let honest = {
            let hashers = hashers.clone();
            tokio::spawn(async move { hashers.acquire(HOME).await.map(drop) })
        };
        while hashers.queued.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        drop(running);
        assert_eq!(honest.await.unwrap(), Ok(()));
        // Every one of the flooder's requests is served in turn, and the
        // sources' entries go with their last request.
        for request in flood {
            assert_eq!(request.await.unwrap(), Ok(()));
        }
        assert_eq!(hashers.sources(), 0);
        assert_eq!(hashers.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_source_waiting_for_its_turn_and_giving_up_leaves_nothing() {
        let hashers = std::sync::Arc::new(Hashers::new(1, 4, 1));
        let running = hashers.acquire(HOME).await.unwrap();
        let waiting = {
            let hashers = hashers.clone();
            tokio::spawn(async move { hashers.acquire(HOME).await.map(drop) })
        };
        // It waits for the source's one place (not in the queue)...
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        assert_eq!(hashers.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
        // ...and gives up (its connection closed), then the holder ends.
        waiting.abort();
        let _ = waiting.await;
        drop(running);
        assert_eq!(hashers.sources(), 0);
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (t1, h1) = new_token();
        let (t2, h2) = new_token();
        assert_eq!(t1.len(), 64);
        assert_ne!(t1, t2);
        assert_ne!(h1, h2);
        assert_eq!(token_hash(&t1), h1);
    }
}
