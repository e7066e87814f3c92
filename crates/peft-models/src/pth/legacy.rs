//! The legacy (non-zip) format of `torch.save(..., _use_new_zipfile_serialization=False)`: five
//! pickles (magic number, protocol version, system info, the object, the storage keys), then for
//! each key in that order an 8-byte little-endian element count and the raw little-endian data.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;

use candle_core::Tensor;

use super::dtype::StorageDtype;
use super::tensor::{self, Storages};
use super::value::Value;
use super::{pickle, Res, NOT_A_CHECKPOINT};

/// 0x1950a86a20f9469cfc6c, little-endian, as the first pickle holds it.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const PROTOCOL_VERSION: i64 = 1001;

struct LegacyStorages<'a> {
    data: &'a [u8],
    ranges: HashMap<Rc<str>, Range<usize>>,
}

impl Storages for LegacyStorages<'_> {
    fn bytes(&mut self, key: &str) -> Res<&[u8]> {
        let range = self.ranges.get(key).cloned();
        range
            .and_then(|r| self.data.get(r))
            .ok_or_else(|| format!("storage {key} is missing from the file"))
    }
}

fn is_big_endian(info: &Value) -> bool {
    let Value::Dict(d) = info else { return false };
    d.pairs().any(
        |(k, v)| matches!((k, v), (Value::Str(k), Value::Bool(false)) if &**k == "little_endian"),
    )
}

/// Reads the tensors of a legacy checkpoint held in `data`.
pub(crate) fn read(data: &[u8]) -> Res<Vec<(String, Tensor)>> {
    let magic = pickle::load(data, 0)?;
    if !matches!(&magic.value, Value::BigInt(b) if **b == MAGIC) {
        return Err(NOT_A_CHECKPOINT.into());
    }
    let version = pickle::load(data, magic.end)?;
    if !matches!(version.value, Value::Int(PROTOCOL_VERSION)) {
        return Err(format!(
            "unsupported legacy format version {} (expected {PROTOCOL_VERSION})",
            match version.value {
                Value::Int(v) => v.to_string(),
                v => v.kind(),
            }
        ));
    }
    let info = pickle::load(data, version.end)?;
    if is_big_endian(&info.value) {
        return Err("big-endian checkpoints are not supported".into());
    }
    let main = pickle::load(data, info.end)?;
    let keys = pickle::load(data, main.end)?;
    let Value::List(keys_list) = &keys.value else {
        return Err(format!(
            "storage keys must be a list, found {}",
            keys.value.kind()
        ));
    };

    let mut meta: HashMap<Rc<str>, (StorageDtype, usize)> = HashMap::new();
    for s in &main.storages {
        match meta.entry(s.key.clone()) {
            Entry::Vacant(e) => {
                e.insert((s.dtype, s.numel));
            }
            Entry::Occupied(e) if *e.get() != (s.dtype, s.numel) => {
                let (d, n) = *e.get();
                return Err(format!(
                    "storage {} is referenced as {n} elements of {} and as {} of {}",
                    s.key,
                    d.name(),
                    s.numel,
                    s.dtype.name()
                ));
            }
            Entry::Occupied(_) => {}
        }
    }

    let mut ranges = HashMap::new();
    let mut pos = keys.end;
    for k in &keys_list.items {
        let Value::Str(k) = k else {
            return Err(format!("storage key must be a str, found {}", k.kind()));
        };
        let &(dtype, numel) = meta
            .get(k)
            .ok_or_else(|| format!("storage {k} is listed but never referenced"))?;
        let header = pos.checked_add(8).and_then(|end| data.get(pos..end));
        let header = header.ok_or_else(|| format!("truncated: no header for storage {k}"))?;
        let mut count = [0u8; 8];
        count.copy_from_slice(header);
        let count = u64::from_le_bytes(count);
        if count != numel as u64 {
            return Err(format!(
                "storage {k} holds {count} elements, but the pickle says {numel}"
            ));
        }
        pos += 8;
        let nbytes = numel
            .checked_mul(dtype.size())
            .ok_or("storage size overflows")?;
        let left = data.len() - pos;
        if nbytes > left {
            return Err(format!(
                "truncated: storage {k} needs {nbytes} bytes, {left} left"
            ));
        }
        if ranges.insert(k.clone(), pos..pos + nbytes).is_some() {
            return Err(format!("storage {k} is listed twice"));
        }
        pos += nbytes;
    }

    let entries = tensor::named_tensors(&main.value, main.end.saturating_sub(info.end))?;
    let mut src = LegacyStorages { data, ranges };
    tensor::materialize(entries, &mut src, tensor::memory_budget(data.len()))
}
