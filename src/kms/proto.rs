//! The messages of the Kubernetes KMS v2 plugin API (`k8s.io/kms/apis/v2/api.proto`, package
//! `v2`), hand-encoded in the protobuf wire format: six small messages do not need a code
//! generator. Fields are written in field-number order, default (empty) values left out as
//! proto3 does; reading skips fields it does not know, takes the last of repeated scalars, and
//! collects map entries (each a nested message with key = 1, value = 2).
//!
//! Buffers that hold a plaintext (an `EncryptRequest`, a `DecryptResponse`) are `Zeroizing`.

use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// `StatusResponse { string version = 1; string healthz = 2; string key_id = 3; }`
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusResponse {
    pub version: String,
    pub healthz: String,
    pub key_id: String,
}

/// `EncryptResponse { bytes ciphertext = 1; string key_id = 2; map<string, bytes> annotations = 3; }`
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptResponse {
    pub ciphertext: Vec<u8>,
    pub key_id: String,
    pub annotations: BTreeMap<String, Vec<u8>>,
}

/// `DecryptRequest { bytes ciphertext = 1; string uid = 2; string key_id = 3; map<string, bytes> annotations = 4; }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecryptRequest<'a> {
    pub ciphertext: &'a [u8],
    pub uid: &'a str,
    pub key_id: &'a str,
    pub annotations: &'a BTreeMap<String, Vec<u8>>,
}

/// A message that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf message: {0}")]
pub struct DecodeError(&'static str);

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

pub(crate) fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn put_len_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    put_varint(buf, (u64::from(field) << 3) | u64::from(LEN));
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// A `map<string, bytes>` field: one length-delimited entry message per pair.
fn put_map_field(buf: &mut Vec<u8>, field: u32, map: &BTreeMap<String, Vec<u8>>) {
    for (key, value) in map {
        let mut entry = Vec::with_capacity(key.len() + value.len() + 6);
        put_len_field(&mut entry, 1, key.as_bytes());
        put_len_field(&mut entry, 2, value);
        put_varint(buf, (u64::from(field) << 3) | u64::from(LEN));
        put_varint(buf, entry.len() as u64);
        buf.extend_from_slice(&entry);
    }
}

/// `StatusRequest {}`: no bytes at all.
pub fn encode_status_request() -> Vec<u8> {
    Vec::new()
}

/// `EncryptRequest { bytes plaintext = 1; string uid = 2; }`
pub fn encode_encrypt_request(plaintext: &[u8], uid: &str) -> Zeroizing<Vec<u8>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(plaintext.len() + uid.len() + 12));
    put_len_field(&mut buf, 1, plaintext);
    put_len_field(&mut buf, 2, uid.as_bytes());
    buf
}

pub fn encode_decrypt_request(req: &DecryptRequest<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(req.ciphertext.len() + 64);
    put_len_field(&mut buf, 1, req.ciphertext);
    put_len_field(&mut buf, 2, req.uid.as_bytes());
    put_len_field(&mut buf, 3, req.key_id.as_bytes());
    put_map_field(&mut buf, 4, req.annotations);
    buf
}

/// The fields of one message, in order: (field number, value). Varints and fixed-width values
/// are returned as `Scalar`, length-delimited ones as `Bytes`.
struct Fields<'a> {
    rest: &'a [u8],
}

enum Value<'a> {
    Scalar,
    Bytes(&'a [u8]),
}

fn get_varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first().ok_or(DecodeError("truncated varint"))?;
        *buf = rest;
        if i == 9 && byte > 1 {
            return Err(DecodeError("varint longer than 64 bits"));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError("varint longer than 10 bytes"))
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.read_one())
    }
}

impl<'a> Fields<'a> {
    fn new(message: &'a [u8]) -> Self {
        Fields { rest: message }
    }

    fn read_one(&mut self) -> Result<(u32, Value<'a>), DecodeError> {
        let tag = get_varint(&mut self.rest)?;
        let field = u32::try_from(tag >> 3).map_err(|_| DecodeError("field number too large"))?;
        if field == 0 {
            return Err(DecodeError("field number 0"));
        }
        let skip = |rest: &mut &'a [u8], n: usize| -> Result<&'a [u8], DecodeError> {
            if rest.len() < n {
                return Err(DecodeError("truncated field"));
            }
            let (value, tail) = rest.split_at(n);
            *rest = tail;
            Ok(value)
        };
        match (tag & 7) as u8 {
            VARINT => get_varint(&mut self.rest).map(|_| (field, Value::Scalar)),
            FIXED64 => skip(&mut self.rest, 8).map(|_| (field, Value::Scalar)),
            FIXED32 => skip(&mut self.rest, 4).map(|_| (field, Value::Scalar)),
            LEN => {
                let len = usize::try_from(get_varint(&mut self.rest)?)
                    .map_err(|_| DecodeError("length too large"))?;
                skip(&mut self.rest, len).map(|v| (field, Value::Bytes(v)))
            }
            _ => Err(DecodeError("unsupported wire type")),
        }
    }
}

fn string(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError("string field is not UTF-8"))
}

fn wrong_type() -> DecodeError {
    DecodeError("known field with the wrong wire type")
}

/// A `map<string, bytes>` entry message.
fn map_entry(entry: &[u8]) -> Result<(String, Vec<u8>), DecodeError> {
    let (mut key, mut value) = (String::new(), Vec::new());
    for field in Fields::new(entry) {
        match field? {
            (1, Value::Bytes(b)) => key = string(b)?,
            (2, Value::Bytes(b)) => value = b.to_vec(),
            (1 | 2, Value::Scalar) => return Err(wrong_type()),
            _ => {}
        }
    }
    Ok((key, value))
}

pub fn decode_status_response(message: &[u8]) -> Result<StatusResponse, DecodeError> {
    let mut out = StatusResponse::default();
    for field in Fields::new(message) {
        match field? {
            (1, Value::Bytes(b)) => out.version = string(b)?,
            (2, Value::Bytes(b)) => out.healthz = string(b)?,
            (3, Value::Bytes(b)) => out.key_id = string(b)?,
            (1..=3, Value::Scalar) => return Err(wrong_type()),
            _ => {}
        }
    }
    Ok(out)
}

pub fn decode_encrypt_response(message: &[u8]) -> Result<EncryptResponse, DecodeError> {
    let mut out = EncryptResponse::default();
    for field in Fields::new(message) {
        match field? {
            (1, Value::Bytes(b)) => out.ciphertext = b.to_vec(),
            (2, Value::Bytes(b)) => out.key_id = string(b)?,
            (3, Value::Bytes(b)) => {
                let (k, v) = map_entry(b)?;
                out.annotations.insert(k, v);
            }
            (1..=3, Value::Scalar) => return Err(wrong_type()),
            _ => {}
        }
    }
    Ok(out)
}

/// `DecryptResponse { bytes plaintext = 1; }`
pub fn decode_decrypt_response(message: &[u8]) -> Result<Zeroizing<Vec<u8>>, DecodeError> {
    let mut out = Zeroizing::new(Vec::new());
    for field in Fields::new(message) {
        match field? {
            (1, Value::Bytes(b)) => {
                out.clear();
                out.extend_from_slice(b);
            }
            (1, Value::Scalar) => return Err(wrong_type()),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(v: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        put_varint(&mut buf, v);
        buf
    }

    #[test]
    fn varints_as_the_protobuf_documentation_spells_them() {
        assert_eq!(varint(0), [0x00]);
        assert_eq!(varint(1), [0x01]);
        assert_eq!(varint(127), [0x7f]);
        assert_eq!(varint(150), [0x96, 0x01]);
        assert_eq!(varint(300), [0xac, 0x02]);
        assert_eq!(varint(u64::MAX).len(), 10);
        for v in [
            0,
            1,
            127,
            128,
            150,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let buf = varint(v);
            let mut slice = buf.as_slice();
            assert_eq!(get_varint(&mut slice).unwrap(), v);
            assert!(slice.is_empty());
        }
        assert!(get_varint(&mut [0x80u8, 0x80].as_slice()).is_err());
        assert!(get_varint(&mut [0xffu8; 11].as_slice()).is_err());
    }

    #[test]
    fn encrypt_request_bytes() {
        // plaintext = 1 ("hi"), uid = 2 ("u1"): tags 0x0a and 0x12.
        assert_eq!(
            encode_encrypt_request(b"hi", "u1").as_slice(),
            [0x0a, 2, b'h', b'i', 0x12, 2, b'u', b'1']
        );
        // A 200-byte plaintext takes a two-byte length.
        let big = encode_encrypt_request(&[7u8; 200], "");
        assert_eq!(&big[..3], [0x0a, 0xc8, 0x01]);
        assert_eq!(big.len(), 203);
        assert!(encode_status_request().is_empty());
    }

    #[test]
    fn decrypt_request_bytes_with_a_map() {
        let annotations = BTreeMap::from([("a.b".to_owned(), vec![1u8, 2])]);
        let req = DecryptRequest {
            ciphertext: b"ct",
            uid: "u",
            key_id: "k1",
            annotations: &annotations,
        };
        assert_eq!(
            encode_decrypt_request(&req),
            [
                0x0a, 2, b'c', b't', // ciphertext = 1
                0x12, 1, b'u', // uid = 2
                0x1a, 2, b'k', b'1', // key_id = 3
                0x22, 9, // annotations = 4, one entry of 9 bytes:
                0x0a, 3, b'a', b'.', b'b', // key = 1
                0x12, 2, 1, 2, // value = 2
            ]
        );
    }

    #[test]
    fn responses_decode_skipping_unknown_fields() {
        // StatusResponse with an unknown varint field 9 and an unknown fixed32 field 10 between.
        let mut msg = vec![0x0a, 2, b'v', b'2', 0x48, 0x96, 0x01, 0x55, 1, 2, 3, 4];
        msg.extend_from_slice(&[0x12, 2, b'o', b'k', 0x1a, 3, b'k', b'e', b'k']);
        assert_eq!(
            decode_status_response(&msg).unwrap(),
            StatusResponse {
                version: "v2".into(),
                healthz: "ok".into(),
                key_id: "kek".into()
            }
        );
        // EncryptResponse with two map entries (one with its fields reversed).
        let msg = [
            0x0a, 1, 0xff, // ciphertext
            0x12, 1, b'k', // key_id
            0x1a, 6, 0x0a, 1, b'x', 0x12, 1, 9, // annotations x = [9]
            0x1a, 6, 0x12, 1, 8, 0x0a, 1, b'y', // annotations y = [8]
        ];
        let resp = decode_encrypt_response(&msg).unwrap();
        assert_eq!(resp.ciphertext, [0xff]);
        assert_eq!(resp.key_id, "k");
        assert_eq!(
            resp.annotations,
            BTreeMap::from([("x".to_owned(), vec![9]), ("y".to_owned(), vec![8])])
        );
        assert_eq!(
            decode_decrypt_response(&[0x0a, 3, 1, 2, 3])
                .unwrap()
                .as_slice(),
            [1, 2, 3]
        );
        assert!(decode_decrypt_response(&[]).unwrap().is_empty());
    }

    #[test]
    fn malformed_messages_are_refused() {
        // Truncated length, wrong wire type for a known field, bad UTF-8, field number 0,
        // wire type 3 (groups), a truncated fixed64.
        assert!(decode_decrypt_response(&[0x0a, 5, 1]).is_err());
        assert!(decode_decrypt_response(&[0x08, 1]).is_err());
        assert!(decode_status_response(&[0x0a, 1, 0xff]).is_err());
        assert!(decode_status_response(&[0x02, 0]).is_err());
        assert!(decode_status_response(&[0x0b]).is_err());
        assert!(decode_encrypt_response(&[0x09, 1, 2]).is_err());
    }

    #[test]
    fn round_trip_through_our_own_encoder() {
        let annotations = BTreeMap::from([
            ("nonce.example.com".to_owned(), vec![0u8; 12]),
            ("empty.example.com".to_owned(), vec![]),
        ]);
        let req = DecryptRequest {
            ciphertext: &[5u8; 300],
            uid: "uid",
            key_id: "key",
            annotations: &annotations,
        };
        // A DecryptRequest read as an EncryptResponse-shaped message with the map at 4: read
        // with the generic field reader, every entry comes back.
        let bytes = encode_decrypt_request(&req);
        let mut seen = BTreeMap::new();
        for field in Fields::new(&bytes) {
            if let (4, Value::Bytes(b)) = field.unwrap() {
                let (k, v) = map_entry(b).unwrap();
                seen.insert(k, v);
            }
        }
        assert_eq!(seen, annotations);
    }
}
