//! CPU time of a process from `/proc/PID/stat`, so a run can report how
//! much server CPU each send cost (`--server-pid`), and how busy the load
//! generator itself was (a saturated load generator makes every number
//! suspect), and how the server's CPU splits over its threads (the
//! runtime's workers against the embedded store's writer thread, say).

use std::collections::BTreeMap;
use std::time::Duration;

/// Clock ticks per second used by `/proc/PID/stat`. `sysconf(_SC_CLK_TCK)`
/// needs libc, so [`clock_ticks_per_second`] asks `getconf CLK_TCK` and
/// falls back to this value, which Linux has used on every mainstream
/// architecture for decades.
pub const DEFAULT_CLK_TCK: u64 = 100;

/// Where a run reads the server's CPU from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCpu {
    /// A server process of its own (`--server-pid`).
    Process(u32),
    /// The in-process server of `--spawn-server`: this process's threads
    /// named as in [`IN_PROCESS_SERVER_THREADS`].
    InProcess,
}

/// Name prefixes of the threads an in-process server runs on: its runtime's
/// (named so by the load generator) and its embedded store's.
pub const IN_PROCESS_SERVER_THREADS: &[&str] = &["chat-server", "sqlite-"];

/// The threads of a sample that belong to an in-process server.
pub fn in_process_server(threads: BTreeMap<u32, ThreadCpu>) -> BTreeMap<u32, ThreadCpu> {
    threads
        .into_iter()
        .filter(|(_, (name, _))| {
            IN_PROCESS_SERVER_THREADS
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .collect()
}

/// User plus system CPU time a process has used so far, or `None` if it
/// cannot be read (no such process, not Linux).
pub fn process_cpu(pid: u32, ticks_per_second: u64) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ticks_to_time(parse_stat_ticks(&stat)?, ticks_per_second))
}

/// Clock ticks as time.
fn ticks_to_time(ticks: u64, ticks_per_second: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / ticks_per_second.max(1) as f64)
}

/// One thread's name and the CPU time it has used so far.
pub type ThreadCpu = (String, Duration);

/// CPU time used so far by each thread of a process, by thread id, from
/// `/proc/PID/task/*/stat`. `None` if the process cannot be read.
pub fn threads_cpu(pid: u32, ticks_per_second: u64) -> Option<BTreeMap<u32, ThreadCpu>> {
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        // A thread may end between the listing and the read: skip it.
        let Ok(task) = task else { continue };
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let (Some(name), Some(ticks)) = (parse_stat_name(&stat), parse_stat_ticks(&stat)) {
            threads.insert(
                tid,
                (name.to_string(), ticks_to_time(ticks, ticks_per_second)),
            );
        }
    }
    Some(threads)
}

/// CPU time used so far by every process whose command name is `command`,
/// by process id (the backends of a database, say).
pub fn command_cpu(command: &str, ticks_per_second: u64) -> BTreeMap<u32, Duration> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            // A process may end between the listing and the read: skip it.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            (parse_stat_name(&stat)? == command).then_some(())?;
            Some((
                pid,
                ticks_to_time(parse_stat_ticks(&stat)?, ticks_per_second),
            ))
        })
        .collect()
}

/// CPU the processes of two [`command_cpu`] samples used in between: one
/// that started counts from zero, one that ended is not counted.
pub fn command_diff(before: &BTreeMap<u32, Duration>, after: &BTreeMap<u32, Duration>) -> Duration {
    after
        .iter()
        .map(|(pid, &t)| t.saturating_sub(before.get(pid).copied().unwrap_or_default()))
        .sum()
}

/// CPU each thread name used between two [`threads_cpu`] samples, thread
/// by thread (threads that share a name, a runtime's workers, are summed).
/// A thread that ended in between is missing from the later sample, so its
/// time in the window is not counted (nor, as a sum by name would have
/// it, taken off its namesakes'); one that started counts from zero.
pub fn threads_diff(
    before: &BTreeMap<u32, ThreadCpu>,
    after: &BTreeMap<u32, ThreadCpu>,
) -> BTreeMap<String, Duration> {
    let mut by_name: BTreeMap<String, Duration> = BTreeMap::new();
    for (tid, (name, t)) in after {
        let t0 = before
            .get(tid)
            .filter(|(was, _)| was == name)
            .map_or(Duration::ZERO, |&(_, t0)| t0);
        *by_name.entry(name.clone()).or_default() += t.saturating_sub(t0);
    }
    by_name
}

/// The command (thread) name from the text of `/proc/PID/stat`: what
/// stands between the first `(` and the last `)`.
pub fn parse_stat_name(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// `utime + stime` from the text of `/proc/PID/stat`.
///
/// The second field (the command name) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted after the last
/// `)`: there, field 3 (state) comes first and utime, stime are fields 14
/// and 15.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's clock tick rate, from `getconf CLK_TCK` when available.
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(DEFAULT_CLK_TCK)
}

/// CPU used over a wall-clock window, as percent of one core.
pub fn percent_of_core(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
}

/// CPU per acked send in microseconds (`None` before any ack).
pub fn micros_per_send(cpu: Duration, acked: u64) -> Option<f64> {
    (acked > 0).then(|| cpu.as_secs_f64() * 1e6 / acked as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the calling thread busy for `wall` of wall-clock time.
    /// Burns CPU on this thread until it has used `cpu` of it by its own
    /// clock (`/proc/thread-self/stat`, in ticks), however long a busy
    /// machine makes that take (a minute at most).
    fn burn(cpu: Duration) {
        let tck = clock_ticks_per_second();
        let ticks = || {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("Linux /proc");
            parse_stat_ticks(&stat).expect("a stat line")
        };
        let want = (cpu.as_secs_f64() * tck as f64).ceil() as u64;
        let start = ticks();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut x = 0u64;
        while ticks() - start < want {
            assert!(std::time::Instant::now() < deadline, "no CPU for a minute");
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
    }

    #[test]
    fn parses_utime_and_stime_even_with_odd_names() {
        let stat = "4242 (chat server) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 50 0 0 20 0 3 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (a) S 1 2"), None);
        assert_eq!(parse_stat_name(stat), Some("chat server) x"));
        assert_eq!(parse_stat_name("garbage"), None);
    }

    #[test]
    fn splits_this_process_by_thread_name() {
        let tck = clock_ticks_per_second();
        let before = threads_cpu(std::process::id(), tck).expect("own threads");
        // A named thread that burns 0.1 s of CPU, then stays alive while
        // the second sample is taken.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (burnt_tx, burnt_rx) = std::sync::mpsc::channel::<()>();
        let burner = std::thread::Builder::new()
            .name("cpu-test-burn".into())
            .spawn(move || {
                burn(Duration::from_millis(100));
                burnt_tx.send(()).expect("test waits");
                let _ = done_rx.recv();
            })
            .expect("spawn");
        burnt_rx.recv().expect("burner reports");
        let after = threads_cpu(std::process::id(), tck).expect("own threads");
        done_tx.send(()).expect("burner waits");
        burner.join().expect("burner");
        let used = threads_diff(&before, &after);
        let burnt = used.get("cpu-test-burn").copied().unwrap_or_default();
        // It burnt 0.1 s by its own clock, however long that took.
        assert!(burnt >= Duration::from_millis(100), "{used:?}");
        assert!(burnt <= Duration::from_secs(5), "{used:?}");
        assert!(threads_cpu(u32::MAX, tck).is_none());
        // Thread by thread: a worker that ended takes nothing off its
        // namesakes' time (summed by name first, the window's total for
        // "worker" came out as 0), and a new thread counts from zero.
        let secs = Duration::from_secs;
        let before = BTreeMap::from([
            (1, ("worker".to_string(), secs(30))),
            (2, ("worker".to_string(), secs(2))),
        ]);
        let after = BTreeMap::from([
            (2, ("worker".to_string(), secs(5))),
            (3, ("worker".to_string(), secs(1))),
            (4, ("store".to_string(), secs(4))),
        ]);
        assert_eq!(
            threads_diff(&before, &after),
            BTreeMap::from([
                ("store".to_string(), secs(4)),
                ("worker".to_string(), secs(4)),
            ])
        );
    }

    #[test]
    fn sums_the_processes_running_a_command() {
        let tck = clock_ticks_per_second();
        let comm = std::fs::read_to_string("/proc/self/comm").expect("Linux /proc");
        let comm = comm.trim();
        let before = command_cpu(comm, tck);
        assert!(
            before.contains_key(&std::process::id()),
            "{comm}: {before:?}"
        );
        burn(Duration::from_millis(100));
        let after = command_cpu(comm, tck);
        let used = command_diff(&before, &after);
        assert!(used >= Duration::from_millis(100), "{used:?}");
        assert!(command_cpu("no-such-comm", tck).is_empty());
        // A process that started in between counts from zero; one that
        // ended is not counted.
        let before = BTreeMap::from([(1, Duration::from_secs(5)), (2, Duration::from_secs(1))]);
        let after = BTreeMap::from([(1, Duration::from_secs(7)), (3, Duration::from_secs(4))]);
        assert_eq!(command_diff(&before, &after), Duration::from_secs(6));
    }

    #[test]
    fn reads_this_process() {
        let tck = clock_ticks_per_second();
        assert!(tck > 0);
        // Burn a little CPU so the reading is not trivially zero.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(process_cpu(std::process::id(), tck).is_some());
        assert!(process_cpu(u32::MAX, tck).is_none());
        assert_eq!(
            percent_of_core(Duration::from_millis(500), Duration::from_secs(1)),
            50.0
        );
        assert_eq!(percent_of_core(Duration::from_secs(1), Duration::ZERO), 0.0);
    }
}
