//! A restricted unpickler: it interprets the opcodes `torch.save` emits and builds plain values,
//! refusing every global outside the allow-list of [`Global::lookup`]. Nothing is ever called or
//! imported; allowed callables only build [`Value`]s.

use std::collections::HashMap;
use std::rc::Rc;

use super::value::{Global, Seq, StorageRef, Value};
use super::Res;

/// One pickle read: the object it returns, the byte after its `STOP`, and every storage its
/// persistent ids named, in order.
pub(crate) struct Loaded {
    pub value: Value,
    pub end: usize,
    pub storages: Vec<StorageRef>,
}

/// Reads the pickle that starts at `start` in `data`.
pub(crate) fn load(data: &[u8], start: usize) -> Res<Loaded> {
    let mut u = Unpickler {
        data,
        pos: start,
        at: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        aliases: HashMap::new(),
        storages: Vec::new(),
        // One unit per opcode plus one per element copied by copy-on-write.
        work_left: data.len().saturating_mul(16).saturating_add(1 << 20),
    };
    let value = u
        .run()
        .map_err(|e| format!("pickle at byte {}: {e}", u.at))?;
    Ok(Loaded {
        value,
        end: u.pos,
        storages: u.storages,
    })
}

/// The unpickler's state: the input, the stack with its marks, and the memo.
pub(super) struct Unpickler<'a> {
    data: &'a [u8],
    pub(super) pos: usize,
    /// Where the current opcode starts.
    pub(super) at: usize,
    pub(super) stack: Vec<Value>,
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u32, Value>,
    /// Memo keys holding each container (by address), so that filling a memoized container
    /// updates the memo too, as Python's shared references do.
    aliases: HashMap<usize, Vec<u32>>,
    pub(super) storages: Vec<StorageRef>,
    pub(super) work_left: usize,
}

impl Unpickler<'_> {
    pub(super) fn take(&mut self, n: usize) -> Res<&[u8]> {
        let (data, pos) = (self.data, self.pos);
        let s = pos.checked_add(n).and_then(|end| data.get(pos..end));
        let s = s.ok_or_else(|| {
            let left = data.len().saturating_sub(pos);
            format!("truncated: needs {n} bytes, {left} left")
        })?;
        self.pos += n;
        Ok(s)
    }

    pub(super) fn arr<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Res<usize> {
        Ok(self.arr::<1>()?[0] as usize)
    }

    pub(super) fn u32(&mut self) -> Res<usize> {
        Ok(u32::from_le_bytes(self.arr()?) as usize)
    }

    pub(super) fn u64(&mut self) -> Res<usize> {
        let n = u64::from_le_bytes(self.arr()?);
        usize::try_from(n).map_err(|_| format!("length {n} too large"))
    }

    pub(super) fn line(&mut self) -> Res<String> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("truncated: no end of line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "line is not UTF-8")?;
        self.pos += n + 1;
        Ok(s.to_string())
    }

    pub(super) fn str(&mut self, n: usize) -> Res<Value> {
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| "string is not UTF-8")?;
        Ok(Value::Str(s.into()))
    }

    pub(super) fn int(&mut self, n: usize) -> Res<Value> {
        let b = self.take(n)?;
        if n > 8 {
            return Ok(Value::BigInt(b.into()));
        }
        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut a = [fill; 8];
        a[..n].copy_from_slice(b);
        Ok(Value::Int(i64::from_le_bytes(a)))
    }

    pub(super) fn pop(&mut self) -> Res<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    pub(super) fn pop_mark(&mut self) -> Res<Vec<Value>> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    pub(super) fn pop_n(&mut self, n: usize) -> Res<Vec<Value>> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err("stack underflow".into());
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    pub(super) fn push_seq(&mut self, kind: fn(Rc<Seq>) -> Value, items: Vec<Value>) -> Res<()> {
        self.stack.push(kind(Rc::new(Seq::from_vec(items)?)));
        Ok(())
    }

    pub(super) fn get(&mut self, key: usize) -> Res<()> {
        let v = u32::try_from(key).ok().and_then(|k| self.memo.get(&k));
        let v = v
            .ok_or_else(|| format!("memo key {key} is not set"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    pub(super) fn put(&mut self, key: usize) -> Res<()> {
        let key = u32::try_from(key).map_err(|_| format!("memo key {key} too large"))?;
        let v = self.stack.last().ok_or("memoizing an empty stack")?.clone();
        if let Value::Dict(s) | Value::List(s) = &v {
            self.aliases
                .entry(Rc::as_ptr(s) as usize)
                .or_default()
                .push(key);
        }
        self.memo.insert(key, v);
        Ok(())
    }

    /// Adds items to the dict (`dict` true) or list on top of the stack.
    pub(super) fn fill(&mut self, dict: bool, items: Vec<Value>) -> Res<()> {
        if dict && items.len() % 2 == 1 {
            return Err("odd number of items for a dict".into());
        }
        let top = match (self.stack.last_mut(), dict) {
            (Some(Value::Dict(s)), true) | (Some(Value::List(s)), false) => s,
            (v, _) => {
                let found = v.map_or("nothing".into(), |v| v.kind());
                return Err(format!("adding items to a {found}"));
            }
        };
        let mut keys = self
            .aliases
            .remove(&(Rc::as_ptr(top) as usize))
            .unwrap_or_default();
        let memo = &self.memo;
        keys.retain(
            |k| matches!(memo.get(k), Some(Value::Dict(m) | Value::List(m)) if Rc::ptr_eq(m, top)),
        );
        for k in &keys {
            self.memo.remove(k);
        }
        if Rc::strong_count(top) > 1 {
            self.work_left = self.work_left.saturating_sub(top.items.len());
        }
        Rc::make_mut(top).extend(items)?;
        if !keys.is_empty() {
            let v = if dict {
                Value::Dict(top.clone())
            } else {
                Value::List(top.clone())
            };
            for k in &keys {
                self.memo.insert(*k, v.clone());
            }
            self.aliases.insert(Rc::as_ptr(top) as usize, keys);
        }
        Ok(())
    }

    pub(super) fn global(&mut self, module: &str, name: &str) -> Res<()> {
        self.stack
            .push(Value::Global(Global::lookup(module, name)?));
        Ok(())
    }
}
