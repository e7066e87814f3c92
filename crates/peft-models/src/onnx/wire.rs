//! The protocol-buffers wire format, as far as reading ONNX needs it: a message is a sequence of
//! fields, each a key (field number and wire type, a varint) and a value. Nothing is allocated
//! from a length before that many bytes are known to be present, and a malformed message is an
//! error, never a panic.

use super::Res;

/// One field's value, borrowing the message's bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    /// Wire type 0: a variable-length integer (int32, int64, enum, bool).
    Varint(u64),
    /// Wire type 1: eight bytes (double, fixed64; no field read here has this type).
    Fixed64,
    /// Wire type 2: a length-delimited run (string, bytes, message, packed repeated).
    Bytes(&'a [u8]),
    /// Wire type 5: four bytes (float, fixed32).
    Fixed32(u32),
}

impl<'a> Value<'a> {
    /// The value as a varint, or an error naming `what`.
    pub(crate) fn varint(self, what: &str) -> Res<u64> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => Err(format!("{what}: expected an integer field")),
        }
    }

    /// The value as a length-delimited run, or an error naming `what`.
    pub(crate) fn bytes(self, what: &str) -> Res<&'a [u8]> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(format!("{what}: expected a length-delimited field")),
        }
    }

    /// The value as UTF-8 text, or an error naming `what`.
    pub(crate) fn text(self, what: &str) -> Res<&'a str> {
        std::str::from_utf8(self.bytes(what)?).map_err(|_| format!("{what}: not UTF-8 text"))
    }
}

/// Iterates over the fields of one message.
pub(crate) struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    /// The fields of the message `data`.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn varint(&mut self) -> Res<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.data.get(self.pos) else {
                return Err("truncated message (a varint runs past the end)".into());
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("malformed varint (longer than 10 bytes)".into())
    }

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "truncated message (a field of {n} bytes at offset {} of {})",
                    self.pos,
                    self.data.len()
                )
            })?;
        let run = &self.data[self.pos..end];
        self.pos = end;
        Ok(run)
    }

    /// The next field as `(field number, value)`, `None` at the end of the message.
    pub(crate) fn next_field(&mut self) -> Res<Option<(u32, Value<'a>)>> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| "field number out of range")?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            w => return Err(format!("unsupported wire type {w} (field {number})")),
        };
        Ok(Some((number, value)))
    }
}

/// The integers of a repeated int64 field, packed (one run) or not (one value): appends to `out`.
pub(crate) fn push_ints(value: Value<'_>, what: &str, out: &mut Vec<i64>) -> Res<()> {
    match value {
        Value::Varint(v) => out.push(v as i64),
        Value::Bytes(run) => {
            let mut f = Fields::new(run);
            while f.pos < run.len() {
                out.push(f.varint()? as i64);
            }
        }
        _ => return Err(format!("{what}: expected integers")),
    }
    Ok(())
}

/// The floats of a repeated float field, packed (one run) or not (one value): appends to `out`.
pub(crate) fn push_floats(value: Value<'_>, what: &str, out: &mut Vec<f32>) -> Res<()> {
    match value {
        Value::Fixed32(v) => out.push(f32::from_bits(v)),
        Value::Bytes(run) if run.len() % 4 == 0 => out.extend(
            run.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
        ),
        _ => return Err(format!("{what}: expected floats")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_wire_type_and_refuses_truncation() {
        // field 1 varint 150, field 2 bytes "ab", field 3 fixed32 1.5, field 4 fixed64 7
        let mut msg = vec![0x08, 0x96, 0x01, 0x12, 0x02, b'a', b'b', 0x1d];
        msg.extend(1.5f32.to_le_bytes());
        msg.push(0x21);
        msg.extend(7u64.to_le_bytes());
        let mut f = Fields::new(&msg);
        assert!(matches!(
            f.next_field().unwrap(),
            Some((1, Value::Varint(150)))
        ));
        assert!(matches!(
            f.next_field().unwrap(),
            Some((2, Value::Bytes(b"ab")))
        ));
        match f.next_field().unwrap() {
            Some((3, Value::Fixed32(bits))) => assert_eq!(f32::from_bits(bits), 1.5),
            other => panic!("{other:?}"),
        }
        assert!(matches!(f.next_field().unwrap(), Some((4, Value::Fixed64))));
        assert!(f.next_field().unwrap().is_none());
        for cut in 1..msg.len() {
            let mut f = Fields::new(&msg[..cut]);
            let mut result = Ok(Some((0, Value::Varint(0))));
            while let Ok(Some(_)) = result {
                result = f.next_field();
            }
            // A cut inside a field is an error; a cut between fields is a shorter message.
            if [3, 7, 12].contains(&cut) {
                assert!(result.is_ok(), "cut {cut}");
            } else {
                assert!(result.is_err(), "cut {cut}");
            }
        }
    }

    #[test]
    fn packed_and_unpacked_repeated_fields() {
        let mut ints = Vec::new();
        push_ints(Value::Varint(3), "dims", &mut ints).unwrap();
        push_ints(Value::Bytes(&[0x01, 0xac, 0x02]), "dims", &mut ints).unwrap();
        assert_eq!(ints, [3, 1, 300]);
        let mut floats = Vec::new();
        let run: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        push_floats(Value::Bytes(&run), "floats", &mut floats).unwrap();
        assert_eq!(floats, [0.5, -2.0]);
        assert!(push_floats(Value::Bytes(&[1, 2, 3]), "floats", &mut floats).is_err());
        // A negative int64 is a ten-byte varint.
        let mut neg = Vec::new();
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        push_ints(Value::Bytes(&bytes), "dims", &mut neg).unwrap();
        assert_eq!(neg, [-1]);
    }
}
