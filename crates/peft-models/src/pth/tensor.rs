//! From tensor records to candle tensors: picking the tensors out of the checkpoint's dict, and
//! copying each strided view out of its storage with every index checked first.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use candle_core::{Device, Tensor};

use super::dtype::StorageDtype;
use super::value::{Seq, TensorRef, Value};
use super::Res;

/// A view with more elements than its storage (stride 0, as `expand` makes) may not exceed this.
const BROADCAST_LIMIT: usize = 64 << 20;

/// Where the storage bytes of a checkpoint come from.
pub(crate) trait Storages {
    /// The bytes of the storage saved under `key`.
    fn bytes(&mut self, key: &str) -> Res<&[u8]>;
    /// Called once no further tensor needs the storage under `key`.
    fn release(&mut self, _key: &str) {}
}

/// How many bytes of tensors a file of `file_len` bytes may produce: tensors sharing storage (tied
/// weights) may repeat bytes, but not without bound.
pub(crate) fn memory_budget(file_len: usize) -> usize {
    file_len.saturating_mul(4).saturating_add(BROADCAST_LIMIT)
}

/// Copies the elements of `t` out of `bytes` (its whole storage) in row-major order.
fn gather(t: &TensorRef, bytes: &[u8], budget: &mut usize) -> Res<Vec<u8>> {
    let s = &t.storage;
    let es = s.dtype.size();
    let need = s.numel.checked_mul(es).ok_or("storage size overflows")?;
    if bytes.len() < need {
        let left = bytes.len();
        return Err(format!(
            "truncated: storage {} needs {need} bytes, {left} left",
            s.key
        ));
    }
    let (base, len) = s.view.unwrap_or((0, s.numel));
    if base.checked_add(len).is_none_or(|end| end > s.numel) {
        return Err(format!("view {base}+{len} lies outside storage {}", s.key));
    }
    let data = bytes
        .get(base * es..(base + len) * es)
        .ok_or("storage out of range")?;
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let numel = numel.ok_or("tensor size overflows")?;
    // Even an empty tensor's shape must have strides that fit (candle computes them).
    let span = t.shape.iter().try_fold(es, |a, &d| a.checked_mul(d.max(1)));
    if span.is_none_or(|s| s > isize::MAX as usize) {
        return Err(format!("tensor size {:?} overflows", t.shape));
    }
    if numel == 0 {
        return Ok(Vec::new());
    }
    // Dimensions of size 1 never move the index, whatever their stride.
    let mut dims: Vec<(usize, usize)> = (t.shape.iter().copied().zip(t.stride.iter().copied()))
        .filter(|&(d, _)| d != 1)
        .collect();
    let last = dims.iter().try_fold(t.offset, |a, &(d, st)| {
        a.checked_add((d - 1).checked_mul(st)?)
    });
    if last.is_none_or(|l| l >= len) {
        return Err(format!(
            "size {:?}, stride {:?} and offset {} reach past the {len} elements of storage {}",
            t.shape, t.stride, t.offset, s.key
        ));
    }
    let nbytes = numel.checked_mul(es).ok_or("tensor size overflows")?;
    if numel > len && nbytes > BROADCAST_LIMIT {
        return Err(format!("a broadcast view of {nbytes} bytes is too large"));
    }
    *budget = budget
        .checked_sub(nbytes)
        .ok_or("the tensors repeat more bytes than the checkpoint holds (too many shared views)")?;
    // Copy runs along the innermost dimension when it is contiguous.
    let run = match dims.last() {
        Some(&(d, 1)) => {
            dims.pop();
            d
        }
        _ => 1,
    };
    let mut out = Vec::with_capacity(nbytes);
    let mut idx = vec![0usize; dims.len()];
    let mut pos = t.offset;
    loop {
        let range = pos
            .checked_mul(es)
            .zip(pos.checked_add(run).and_then(|e| e.checked_mul(es)));
        let chunk = range
            .and_then(|(a, b)| data.get(a..b))
            .ok_or("index out of range")?;
        out.extend_from_slice(chunk);
        let mut done = true;
        for (i, &(d, st)) in idx.iter_mut().zip(&dims).rev() {
            *i += 1;
            pos = pos.wrapping_add(st);
            if *i < d {
                done = false;
                break;
            }
            pos = pos.wrapping_sub(st.wrapping_mul(d));
            *i = 0;
        }
        if done {
            return Ok(out);
        }
    }
}

/// Builds the candle tensor of `t` from the bytes of its storage.
fn to_tensor(t: &TensorRef, bytes: &[u8], budget: &mut usize) -> Res<Tensor> {
    let raw = gather(t, bytes, budget)?;
    let raw = match t.storage.dtype {
        StorageDtype::I8 => raw
            .iter()
            .flat_map(|&b| i16::from(b as i8).to_le_bytes())
            .collect(),
        StorageDtype::Bool => raw.iter().map(|&b| u8::from(b != 0)).collect(),
        _ => raw,
    };
    let dtype = t.storage.dtype.candle();
    Tensor::from_raw_buffer(&raw, dtype, &t.shape, &Device::Cpu).map_err(|e| e.to_string())
}

type ViewKey = (
    Rc<str>,
    StorageDtype,
    Option<(usize, usize)>,
    usize,
    Vec<usize>,
    Vec<usize>,
);

/// Builds every named tensor, reading each storage once; identical views share one tensor.
pub(crate) fn materialize(
    entries: Vec<(String, Rc<TensorRef>)>,
    src: &mut dyn Storages,
    mut budget: usize,
) -> Res<Vec<(String, Tensor)>> {
    let last_use: HashMap<Rc<str>, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, (_, t))| (t.storage.key.clone(), i))
        .collect();
    let mut cache: HashMap<ViewKey, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, (name, t)) in entries.into_iter().enumerate() {
        let s = &t.storage;
        let key = (
            s.key.clone(),
            s.dtype,
            s.view,
            t.offset,
            t.shape.clone(),
            t.stride.clone(),
        );
        let tensor = match cache.get(&key) {
            Some(x) => x.clone(),
            None => {
                let bytes = src
                    .bytes(&s.key)
                    .map_err(|e| format!("tensor `{name}`: {e}"))?;
                let x = to_tensor(&t, bytes, &mut budget)
                    .map_err(|e| format!("tensor `{name}` ({}): {e}", s.dtype.name()))?;
                cache.insert(key, x.clone());
                x
            }
        };
        if last_use.get(&s.key) == Some(&i) {
            src.release(&s.key);
        }
        out.push((name, tensor));
    }
    Ok(out)
}

/// Counts the dict entries visited, so that dicts shared many times over (a pickle can reference
/// one dict from many places cheaply) cannot make the walk exponential.
fn visit(left: &mut usize, n: usize) -> Res<()> {
    *left = left
        .checked_sub(n)
        .ok_or("the checkpoint's dicts are shared too often to walk")?;
    Ok(())
}

/// The entries of a dict with str (or int) keys, in insertion order; a repeated key keeps its
/// first place and its last value, as in Python.
fn entries<'a>(d: &'a Seq, left: &mut usize) -> Res<Vec<(String, &'a Value)>> {
    visit(left, d.items.len())?;
    let mut out: Vec<(String, &Value)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for (k, v) in d.pairs() {
        let k = match k {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => continue,
        };
        match at.get(&k).and_then(|&i| out.get_mut(i)) {
            Some(e) => e.1 = v,
            None => {
                at.insert(k.clone(), out.len());
                out.push((k, v));
            }
        }
    }
    Ok(out)
}

fn has_tensor(d: &Seq, left: &mut usize) -> Res<bool> {
    visit(left, d.items.len())?;
    for (_, v) in d.pairs() {
        match v {
            Value::Tensor(_) => return Ok(true),
            Value::Dict(d) if has_tensor(d, left)? => return Ok(true),
            _ => {}
        }
    }
    Ok(false)
}

/// Appends the tensors of `d` and of the dicts within it, named `prefix` + the dotted keys.
fn flatten(
    d: &Seq,
    prefix: &str,
    out: &mut Vec<(String, Rc<TensorRef>)>,
    seen: &mut HashSet<String>,
    left: &mut usize,
) -> Res<()> {
    for (k, v) in entries(d, left)? {
        let name = format!("{prefix}{k}");
        match v {
            Value::Tensor(t) => {
                if !seen.insert(name.clone()) {
                    return Err(format!("two tensors are named `{name}`"));
                }
                out.push((name, t.clone()));
            }
            Value::Dict(d) => flatten(d, &format!("{name}."), out, seen, left)?,
            _ => {}
        }
    }
    Ok(())
}

/// The named tensors of the checkpoint's top-level object: a dict of tensors (nested dicts joined
/// with dots), or the dict of tensors under its `state_dict` or `model` key. `pickle_len`, the
/// size of the pickle, bounds the walk: a tree of dicts needs at least a byte per entry.
pub(crate) fn named_tensors(root: &Value, pickle_len: usize) -> Res<Vec<(String, Rc<TensorRef>)>> {
    let Value::Dict(top) = root else {
        return Err(format!(
            "the checkpoint holds a {}, not a dict of tensors",
            root.kind()
        ));
    };
    let left = &mut pickle_len.saturating_mul(4).saturating_add(1024);
    let mut inner = None;
    for (k, v) in entries(top, left)? {
        match v {
            Value::Dict(d) if k == "state_dict" && has_tensor(d, left)? => inner = Some(d),
            Value::Dict(d) if k == "model" && inner.is_none() && has_tensor(d, left)? => {
                inner = Some(d)
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    flatten(
        inner.unwrap_or(top),
        "",
        &mut out,
        &mut HashSet::new(),
        left,
    )?;
    Ok(out)
}
