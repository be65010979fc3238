//! JSON objects whose last field authenticates the bytes before it: the audit log's `"hash"`
//! and the store's `"mac"`. The field is always last and holds 64 hex digits, so the bytes it
//! covers are exactly the serialized object up to that field, and checking it needs no
//! canonical re-serialization. Works on bytes: no input can make it panic.

/// The length of the value: 32 bytes as lowercase hex.
const VALUE_LEN: usize = 64;

fn suffix_len(field: &str) -> usize {
    // `,"` field `":"` value `"}`
    2 + field.len() + 3 + VALUE_LEN + 2
}

/// `body` (a serialized JSON object with at least one field) with `"field":"<value>"` appended
/// as its last field. `value` is 32 bytes, written as hex.
pub fn append(body: &[u8], field: &str, value: &[u8; 32]) -> Vec<u8> {
    debug_assert!(body.len() > 2 && body.last() == Some(&b'}'));
    let mut line = Vec::with_capacity(body.len() + suffix_len(field));
    line.extend_from_slice(&body[..body.len() - 1]);
    line.extend_from_slice(b",\"");
    line.extend_from_slice(field.as_bytes());
    line.extend_from_slice(b"\":\"");
    line.extend_from_slice(crate::hex::encode(value).as_bytes());
    line.extend_from_slice(b"\"}");
    line
}

/// Splits an object made by [`append`] into the body it covers (as `append` was given it) and
/// the value. `None` if `field` is not the object's last field or its value is not 64 hex
/// digits.
pub fn split(line: &[u8], field: &str) -> Option<(Vec<u8>, [u8; 32])> {
    let suffix = suffix_len(field);
    if line.len() < suffix + 2 {
        return None;
    }
    let (head, tail) = line.split_at(line.len() - suffix);
    let mut prefix = Vec::with_capacity(field.len() + 5);
    prefix.extend_from_slice(b",\"");
    prefix.extend_from_slice(field.as_bytes());
    prefix.extend_from_slice(b"\":\"");
    let value = tail.strip_prefix(prefix.as_slice())?.strip_suffix(b"\"}")?;
    let value = std::str::from_utf8(value).ok()?;
    let value = crate::hex::decode_32(value)?;
    let mut body = Vec::with_capacity(head.len() + 1);
    body.extend_from_slice(head);
    body.push(b'}');
    Some((body, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let body = br#"{"a":1,"b":"x"}"#;
        let line = append(body, "mac", &[0xab; 32]);
        assert!(serde_json::from_slice::<serde_json::Value>(&line).is_ok());
        let (back, value) = split(&line, "mac").unwrap();
        assert_eq!(back, body);
        assert_eq!(value, [0xab; 32]);
        assert!(split(&line, "hash").is_none());
        assert!(split(body, "mac").is_none());
        assert!(split(b"", "mac").is_none());
        // Multi-byte characters where the suffix is expected: refused, never a panic.
        let odd = "{\"a\":\"".to_owned() + &"é".repeat(60) + "\"}";
        assert!(split(odd.as_bytes(), "mac").is_none());
        let mut upper = line.clone();
        let n = upper.len();
        upper[n - 4] = b'G';
        assert!(split(&upper, "mac").is_none());
    }
}
