//! Typed, namespaced key-value metadata (GGUF-style), parsed zero-copy.

use super::{FormatError, rd_u32, rd_u64};
use alloc::string::ToString;
use alloc::vec::Vec;

/// Longest metadata key, in bytes.
pub const MAX_KEY_LEN: u32 = 256;

/// On-disk value type codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MetaType {
    U64 = 0,
    I64 = 1,
    F64 = 2,
    Bool = 3,
    Str = 4,
    Bytes = 5,
    Array = 6,
}

impl MetaType {
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => Self::U64,
            1 => Self::I64,
            2 => Self::F64,
            3 => Self::Bool,
            4 => Self::Str,
            5 => Self::Bytes,
            6 => Self::Array,
            _ => return None,
        })
    }
}

/// A metadata value borrowed from the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue<'a> {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(&'a str),
    Bytes(&'a [u8]),
    Array(MetaArray<'a>),
}

/// A homogeneous array of scalars or strings (arrays do not nest).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray<'a> {
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Str(Vec<&'a str>),
}

/// All metadata entries, in key order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata<'a> {
    entries: Vec<(&'a str, MetaValue<'a>)>,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], FormatError> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(FormatError::MetadataTruncated { what });
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(rd_u32(self.take(4, what)?, 0))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        Ok(rd_u64(self.take(8, what)?, 0))
    }
    fn left(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }
}

fn scalar<'a>(c: &mut Cursor<'a>, ty: MetaType, key: &str) -> Result<MetaValue<'a>, FormatError> {
    Ok(match ty {
        MetaType::U64 => MetaValue::U64(c.u64("u64 value")?),
        MetaType::I64 => MetaValue::I64(c.u64("i64 value")? as i64),
        MetaType::F64 => MetaValue::F64(f64::from_bits(c.u64("f64 value")?)),
        MetaType::Bool => match c.u8("bool value")? {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            byte => return Err(FormatError::BadBool { key: key.to_string(), byte }),
        },
        MetaType::Str => {
            let n = c.u64("string length")?;
            let raw = c.take(n, "string bytes")?;
            let s = core::str::from_utf8(raw).map_err(|_| FormatError::ValueNotUtf8 { key: key.to_string() })?;
            MetaValue::Str(s)
        }
        MetaType::Bytes => {
            let n = c.u64("bytes length")?;
            MetaValue::Bytes(c.take(n, "bytes")?)
        }
        MetaType::Array => return Err(FormatError::BadValueType { key: key.to_string(), ty: 6 }),
    })
}

impl<'a> Metadata<'a> {
    /// Parses a metadata section: `u64 count`, then `count` entries, nothing after.
    ///
    /// # Errors
    /// Truncation, unknown types, invalid UTF-8, unsorted or duplicate keys, trailing bytes.
    pub fn parse(b: &'a [u8]) -> Result<Self, FormatError> {
        let mut c = Cursor { b, pos: 0 };
        let count = c.u64("entry count")?;
        // Smallest entry: 4-byte key length + 1-byte key + type + 1-byte bool.
        if count > c.left() / 7 {
            return Err(FormatError::MetadataCount { count, len: b.len() as u64 });
        }
        let mut entries: Vec<(&'a str, MetaValue<'a>)> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let klen = c.u32("key length")?;
            if klen == 0 || klen > MAX_KEY_LEN {
                return Err(FormatError::BadKeyLen { len: klen, max: MAX_KEY_LEN });
            }
            let key = core::str::from_utf8(c.take(u64::from(klen), "key")?).map_err(|_| FormatError::KeyNotUtf8)?;
            if entries.last().is_some_and(|(prev, _)| *prev >= key) {
                return Err(FormatError::KeyOrder { key: key.to_string() });
            }
            let code = c.u8("value type")?;
            let ty = MetaType::from_code(code)
                .ok_or_else(|| FormatError::BadValueType { key: key.to_string(), ty: code })?;
            let value = if ty == MetaType::Array {
                let ecode = c.u8("array element type")?;
                let ety = MetaType::from_code(ecode)
                    .filter(|t| !matches!(t, MetaType::Array | MetaType::Bytes))
                    .ok_or_else(|| FormatError::BadValueType { key: key.to_string(), ty: ecode })?;
                let n = c.u64("array length")?;
                // Every element takes at least its minimum encoded size (bool 1, string 8
                // for its length, others 8): bounds the allocation by the section size.
                let min_elem = if ety == MetaType::Bool { 1 } else { 8 };
                if n > c.left() / min_elem {
                    return Err(FormatError::MetadataTruncated { what: "array elements" });
                }
                MetaValue::Array(array(&mut c, ety, n as usize, key)?)
            } else {
                scalar(&mut c, ty, key)?
            };
            entries.push((key, value));
        }
        if c.left() != 0 {
            return Err(FormatError::MetadataTrailing { extra: c.left() });
        }
        Ok(Self { entries })
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue<'a>> {
        self.entries.binary_search_by(|(k, _)| (*k).cmp(key)).ok().map(|i| &self.entries[i].1)
    }

    /// All entries in key order.
    pub fn entries(&self) -> &[(&'a str, MetaValue<'a>)] {
        &self.entries
    }

    /// Builds metadata from owned-or-borrowed entries (sorted here; duplicates keep the last).
    pub fn from_entries(mut entries: Vec<(&'a str, MetaValue<'a>)>) -> Self {
        entries.sort_by(|a, b| a.0.cmp(b.0));
        entries.reverse();
        entries.dedup_by(|a, b| a.0 == b.0);
        entries.reverse();
        Self { entries }
    }

    /// Serializes to the on-disk section form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (k, v) in &self.entries {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            write_value(&mut out, v);
        }
        out
    }
}

fn array<'a>(c: &mut Cursor<'a>, ety: MetaType, n: usize, key: &str) -> Result<MetaArray<'a>, FormatError> {
    macro_rules! collect {
        ($variant:ident, $pat:ident) => {{
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                match scalar(c, ety, key)? {
                    MetaValue::$pat(x) => v.push(x),
                    _ => unreachable!("scalar() returns the variant of the type it was given"),
                }
            }
            MetaArray::$variant(v)
        }};
    }
    Ok(match ety {
        MetaType::U64 => collect!(U64, U64),
        MetaType::I64 => collect!(I64, I64),
        MetaType::F64 => collect!(F64, F64),
        MetaType::Bool => collect!(Bool, Bool),
        MetaType::Str => collect!(Str, Str),
        MetaType::Bytes | MetaType::Array => unreachable!("filtered by the caller"),
    })
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue<'_>) {
    let bytes_with_len = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    match v {
        MetaValue::U64(x) => {
            out.push(MetaType::U64 as u8);
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::I64(x) => {
            out.push(MetaType::I64 as u8);
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::F64(x) => {
            out.push(MetaType::F64 as u8);
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        MetaValue::Bool(x) => {
            out.push(MetaType::Bool as u8);
            out.push(u8::from(*x));
        }
        MetaValue::Str(s) => {
            out.push(MetaType::Str as u8);
            bytes_with_len(out, s.as_bytes());
        }
        MetaValue::Bytes(b) => {
            out.push(MetaType::Bytes as u8);
            bytes_with_len(out, b);
        }
        MetaValue::Array(a) => {
            out.push(MetaType::Array as u8);
            let (ety, n) = match a {
                MetaArray::U64(v) => (MetaType::U64, v.len()),
                MetaArray::I64(v) => (MetaType::I64, v.len()),
                MetaArray::F64(v) => (MetaType::F64, v.len()),
                MetaArray::Bool(v) => (MetaType::Bool, v.len()),
                MetaArray::Str(v) => (MetaType::Str, v.len()),
            };
            out.push(ety as u8);
            out.extend_from_slice(&(n as u64).to_le_bytes());
            match a {
                MetaArray::U64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::I64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::F64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
                MetaArray::Bool(v) => v.iter().for_each(|x| out.push(u8::from(*x))),
                MetaArray::Str(v) => v.iter().for_each(|s| bytes_with_len(out, s.as_bytes())),
            }
        }
    }
}

impl MetaValue<'_> {
    /// Short type name for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
            Self::Bool(_) => "bool",
            Self::Str(_) => "string",
            Self::Bytes(_) => "bytes",
            Self::Array(_) => "array",
        }
    }
}
