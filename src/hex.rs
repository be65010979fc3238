//! Lowercase hex, the one text form this project gives digests, MACs and random suffixes (file
//! names, audit hashes, idempotency fingerprints, token hashes). A leaf module: it imports
//! nothing from the crate, so every layer may use it.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex, two digits per byte.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(digit(b >> 4)));
        out.push(char::from(digit(b)));
    }
    out
}

/// The lowercase digit of the low four bits of `nibble`.
pub fn digit(nibble: u8) -> u8 {
    DIGITS[usize::from(nibble & 0x0f)]
}

/// The value of a lowercase hex digit; `None` for anything else (an uppercase one included).
pub fn value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// The 32 bytes written as 64 lowercase hex digits, or `None` for anything else. Only the form
/// [`encode`] writes is read, so one value has one text form: a MAC or hash field cannot be
/// changed (a digit's case) without being refused.
pub fn decode_32(s: &str) -> Option<[u8; 32]> {
    let digits = s.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (value(pair[0])? << 4) | value(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_format_and_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(encode(&bytes), expected);
        assert_eq!(encode(&[]), "");
        let digest: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        assert_eq!(decode_32(&encode(&digest)), Some(digest));
        // One value, one text form.
        assert_eq!(decode_32(&encode(&digest).to_uppercase()), None);
    }

    #[test]
    fn decode_refuses_what_is_not_64_hex_digits() {
        let good = "ab".repeat(32);
        assert!(decode_32(&good).is_some());
        assert_eq!(decode_32(&good[..62]), None);
        assert_eq!(decode_32(&format!("{good}00")), None);
        assert_eq!(decode_32(&format!("g{}", &good[1..])), None);
        assert_eq!(decode_32(&format!("+{}", &good[1..])), None);
        // 64 bytes but not 64 ASCII digits.
        assert_eq!(decode_32(&format!("é{}", &good[2..])), None);
    }
}
