//! The kernel's count of UDP datagrams dropped because a socket's receive
//! buffer was full (`RcvbufErrors` in `/proc/net/snmp`). Machine-wide, so
//! it covers the server's socket and the load generator's alike: every
//! drop is a QUIC loss and shows up as retransmission latency, so a run
//! with drops measured the buffers as much as the server.

/// `RcvbufErrors` of the `Udp:` lines of `/proc/net/snmp`, or `None` where
/// it cannot be read (not Linux).
pub fn rcvbuf_errors() -> Option<u64> {
    parse_rcvbuf_errors(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

/// The `RcvbufErrors` value from the text of `/proc/net/snmp`: a `Udp:`
/// header line naming the fields, then a `Udp:` line with their values.
pub fn parse_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?;
    let values = udp.next()?;
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_udp_rcvbuf_errors_column() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 13405939 33238 117657 13556911 4242 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 7 0\n";
        assert_eq!(parse_rcvbuf_errors(snmp), Some(4242));
        assert_eq!(parse_rcvbuf_errors("Udp: InDatagrams\nUdp: 1\n"), None);
        assert_eq!(parse_rcvbuf_errors("garbage"), None);
    }

    #[test]
    fn reads_this_machine() {
        if cfg!(target_os = "linux") {
            assert!(rcvbuf_errors().is_some());
        }
    }
}
