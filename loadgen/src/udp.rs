//! The kernel's UDP counters from `/proc/net/snmp` and, for IPv6,
//! `/proc/net/snmp6` (added together), machine-wide, so they cover the
//! server's sockets and the load generator's alike:
//!
//! * `RcvbufErrors`, datagrams dropped because a socket's receive buffer
//!   was full. Every drop is a QUIC loss and shows up as retransmission
//!   latency, so a run with drops measured the buffers as much as the
//!   server.
//! * `OutDatagrams`, datagrams sent. Per send, this is what the protocol's
//!   coalescing (acks, receipts, frames of several streams in one packet)
//!   saves or costs, on both ends together.

/// The UDP counters of one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams sent.
    pub out_datagrams: u64,
    /// Datagrams dropped for a full receive buffer.
    pub rcvbuf_errors: u64,
}

impl UdpCounters {
    /// This machine's counters, or `None` where they cannot be read (not
    /// Linux).
    pub fn read() -> Option<Self> {
        let v4 = Self::parse(&std::fs::read_to_string("/proc/net/snmp").ok()?)?;
        // Without IPv6 in the kernel the file is missing: IPv4 alone.
        let v6 = std::fs::read_to_string("/proc/net/snmp6")
            .ok()
            .and_then(|text| Self::parse6(&text));
        Some(v6.map_or(v4, |v6| v4.plus(v6)))
    }

    /// The counters from the text of `/proc/net/snmp6`: one `name value`
    /// pair a line (`Udp6OutDatagrams`, `Udp6RcvbufErrors`).
    pub fn parse6(snmp6: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            snmp6.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next()? == name).then(|| words.next()?.parse().ok())?
            })
        };
        Some(UdpCounters {
            out_datagrams: field("Udp6OutDatagrams")?,
            rcvbuf_errors: field("Udp6RcvbufErrors")?,
        })
    }

    fn plus(self, other: Self) -> Self {
        UdpCounters {
            out_datagrams: self.out_datagrams + other.out_datagrams,
            rcvbuf_errors: self.rcvbuf_errors + other.rcvbuf_errors,
        }
    }

    /// The counters from the text of `/proc/net/snmp`: a `Udp:` header
    /// line naming the fields, then a `Udp:` line with their values.
    pub fn parse(snmp: &str) -> Option<Self> {
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let names: Vec<&str> = udp.next()?.split_whitespace().collect();
        let values: Vec<&str> = udp.next()?.split_whitespace().collect();
        let field = |name: &str| -> Option<u64> {
            let column = names.iter().position(|n| *n == name)?;
            values.get(column)?.parse().ok()
        };
        Some(UdpCounters {
            out_datagrams: field("OutDatagrams")?,
            rcvbuf_errors: field("RcvbufErrors")?,
        })
    }

    /// What happened between `self` and the later sample `later`.
    pub fn until(self, later: Self) -> Self {
        UdpCounters {
            out_datagrams: later.out_datagrams.saturating_sub(self.out_datagrams),
            rcvbuf_errors: later.rcvbuf_errors.saturating_sub(self.rcvbuf_errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_udp_columns_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 13405939 33238 117657 13556911 4242 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 7 0\n";
        assert_eq!(
            UdpCounters::parse(snmp),
            Some(UdpCounters {
                out_datagrams: 13_556_911,
                rcvbuf_errors: 4242,
            })
        );
        assert_eq!(UdpCounters::parse("Udp: InDatagrams\nUdp: 1\n"), None);
        assert_eq!(
            UdpCounters::parse("Udp: OutDatagrams RcvbufErrors\nUdp: 5\n"),
            None
        );
        assert_eq!(UdpCounters::parse("garbage"), None);
    }

    #[test]
    fn reads_the_udp6_lines_by_name() {
        let snmp6 = "Ip6InReceives                   	120\n\
                     Udp6InDatagrams                 	57\n\
                     Udp6OutDatagrams                	61\n\
                     Udp6RcvbufErrors                	3\n\
                     UdpLite6RcvbufErrors            	9\n";
        assert_eq!(
            UdpCounters::parse6(snmp6),
            Some(UdpCounters {
                out_datagrams: 61,
                rcvbuf_errors: 3,
            })
        );
        assert_eq!(UdpCounters::parse6("Udp6OutDatagrams 1\n"), None);
        assert_eq!(UdpCounters::parse6("garbage"), None);
    }

    #[test]
    fn a_window_is_the_difference_of_two_samples() {
        let a = UdpCounters {
            out_datagrams: 100,
            rcvbuf_errors: 7,
        };
        let b = UdpCounters {
            out_datagrams: 350,
            rcvbuf_errors: 7,
        };
        assert_eq!(
            a.until(b),
            UdpCounters {
                out_datagrams: 250,
                rcvbuf_errors: 0,
            }
        );
    }

    #[test]
    fn reads_this_machine() {
        if cfg!(target_os = "linux") {
            let a = UdpCounters::read().expect("Linux has /proc/net/snmp");
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.send_to(b"x", socket.local_addr().unwrap()).unwrap();
            let b = UdpCounters::read().unwrap();
            assert!(a.until(b).out_datagrams >= 1);
            // IPv6 traffic counts too (where the machine has IPv6).
            if let Ok(socket) = std::net::UdpSocket::bind("[::1]:0") {
                let before = UdpCounters::read().unwrap();
                for _ in 0..64 {
                    socket.send_to(b"x", socket.local_addr().unwrap()).unwrap();
                }
                let after = UdpCounters::read().unwrap();
                assert!(before.until(after).out_datagrams >= 64);
            }
        }
    }
}
