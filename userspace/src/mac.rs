//! Ethernet MAC addresses as the CLI, config and maps see them.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct MacAddr(pub [u8; 6]);

impl std::hash::Hash for MacAddr {
    /// One 64-bit word, not a length prefix and six bytes: the switch hashes a destination
    /// for every frame a guest sends.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, 0, 0]));
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("invalid MAC address {0:?}: expected six hex octets like 52:54:00:12:34:56")]
    Syntax(String),
    #[error("invalid MAC address {0}: a VM port needs a unicast address (first octet even)")]
    Multicast(MacAddr),
    #[error("invalid MAC address {0}: all zeros")]
    Zero(MacAddr),
}

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// Parses and checks that the address can own a port: unicast and not zero.
    pub fn parse_unicast(s: &str) -> Result<MacAddr, MacError> {
        let mac: MacAddr = s.parse()?;
        if mac.is_multicast() {
            return Err(MacError::Multicast(mac));
        }
        if mac.0 == [0; 6] {
            return Err(MacError::Zero(mac));
        }
        Ok(mac)
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let err = || MacError::Syntax(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "52:54:00:12:34:5A".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0x12, 0x34, 0x5a]);
        assert_eq!(m.to_string(), "52:54:00:12:34:5a");
        assert_eq!("52-54-00-12-34-5a".parse::<MacAddr>().unwrap(), m);
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:zz",
            "525400123456",
            "5:54:00:12:34:56",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            MacAddr::parse_unicast("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            MacAddr::parse_unicast("ff:ff:ff:ff:ff:ff"),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            MacAddr::parse_unicast("00:00:00:00:00:00"),
            Err(MacError::Zero(_))
        ));
    }
}
