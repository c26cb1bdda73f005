//! The kernel's UDP counters from `/proc/net/snmp`, machine-wide, so they
//! cover the server's sockets and the load generator's alike:
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
        Self::parse(&std::fs::read_to_string("/proc/net/snmp").ok()?)
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
        }
    }
}
