//! The opcode loop of the restricted unpickler: the opcodes of protocol 2 that `torch.save` emits
//! (and the binary ones of later protocols), each checked before it touches the stack.

use std::rc::Rc;

use super::pickle::Unpickler;
use super::value::{persistent_load, reduce, Global, Value};
use super::Res;

const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const MARK: u8 = b'(';
const STOP: u8 = b'.';
const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const EMPTY_TUPLE: u8 = b')';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE3: u8 = 0x87;
const LIST: u8 = b'l';
const DICT: u8 = b'd';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const BINFLOAT: u8 = b'G';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BINUNICODE: u8 = b'X';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE8: u8 = 0x8d;
const BINBYTES: u8 = b'B';
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES8: u8 = 0x8e;
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const MEMOIZE: u8 = 0x94;
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const GLOBAL: u8 = b'c';
const STACK_GLOBAL: u8 = 0x93;
const REDUCE: u8 = b'R';
const BUILD: u8 = b'b';
const BINPERSID: u8 = b'Q';
const PERSID: u8 = b'P';
const INST: u8 = b'i';
const OBJ: u8 = b'o';
const NEWOBJ: u8 = 0x81;
const NEWOBJ_EX: u8 = 0x92;

impl Unpickler<'_> {
    /// Interprets opcodes up to `STOP` and returns the object on top of the stack.
    pub(super) fn run(&mut self) -> Res<Value> {
        loop {
            self.at = self.pos;
            self.work_left = self.work_left.checked_sub(1).ok_or("pickle too complex")?;
            let op = self.u8().map_err(|_| "truncated: no STOP opcode")? as u8;
            match op {
                PROTO => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("unsupported pickle protocol {p}"));
                    }
                }
                FRAME => {
                    self.take(8)?;
                }
                MARK => self.marks.push(self.stack.len()),
                STOP => return self.pop(),
                EMPTY_DICT => self.stack.push(Value::Dict(Rc::default())),
                EMPTY_LIST => self.stack.push(Value::List(Rc::default())),
                EMPTY_TUPLE => self.stack.push(Value::Tuple(Rc::default())),
                TUPLE => {
                    let items = self.pop_mark()?;
                    self.push_seq(Value::Tuple, items)?;
                }
                TUPLE1..=TUPLE3 => {
                    let items = self.pop_n(usize::from(op - TUPLE1 + 1))?;
                    self.push_seq(Value::Tuple, items)?;
                }
                LIST => {
                    let items = self.pop_mark()?;
                    self.push_seq(Value::List, items)?;
                }
                DICT => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 == 1 {
                        return Err("odd number of items for a dict".into());
                    }
                    self.push_seq(Value::Dict, items)?;
                }
                SETITEM | APPEND => {
                    let items = self.pop_n(if op == SETITEM { 2 } else { 1 })?;
                    self.fill(op == SETITEM, items)?;
                }
                SETITEMS | APPENDS => {
                    let items = self.pop_mark()?;
                    self.fill(op == SETITEMS, items)?;
                }
                BININT => {
                    let v = self.int(4)?;
                    self.stack.push(v);
                }
                BININT1 | BININT2 => {
                    let n = if op == BININT1 {
                        self.u8()?
                    } else {
                        u16::from_le_bytes(self.arr()?) as usize
                    };
                    self.stack.push(Value::Int(n as i64));
                }
                LONG1 | LONG4 => {
                    let n = if op == LONG1 { self.u8()? } else { self.u32()? };
                    let v = self.int(n)?;
                    self.stack.push(v);
                }
                BINFLOAT => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                NONE => self.stack.push(Value::None),
                NEWTRUE | NEWFALSE => self.stack.push(Value::Bool(op == NEWTRUE)),
                BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => {
                    let n = match op {
                        BINUNICODE => self.u32()?,
                        SHORT_BINUNICODE => self.u8()?,
                        _ => self.u64()?,
                    };
                    let v = self.str(n)?;
                    self.stack.push(v);
                }
                BINBYTES | SHORT_BINBYTES | BINBYTES8 => {
                    let n = match op {
                        BINBYTES => self.u32()?,
                        SHORT_BINBYTES => self.u8()?,
                        _ => self.u64()?,
                    };
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                BINPUT | LONG_BINPUT | MEMOIZE => {
                    let key = match op {
                        BINPUT => self.u8()?,
                        LONG_BINPUT => self.u32()?,
                        _ => self.memo.len(),
                    };
                    self.put(key)?;
                }
                BINGET | LONG_BINGET => {
                    let key = if op == BINGET {
                        self.u8()?
                    } else {
                        self.u32()?
                    };
                    self.get(key)?;
                }
                GLOBAL => {
                    let (module, name) = (self.line()?, self.line()?);
                    self.global(&module, &name)?;
                }
                STACK_GLOBAL => match (self.pop()?, self.pop()?) {
                    (Value::Str(name), Value::Str(module)) => self.global(&module, &name)?,
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                },
                REDUCE => {
                    let args = self.pop()?;
                    let v = match self.pop()? {
                        Value::Global(g) => reduce(g, &args)?,
                        v => return Err(format!("REDUCE on a {}", v.kind())),
                    };
                    self.stack.push(v);
                }
                BUILD => {
                    // The state of a dict (an OrderedDict's `_metadata`) or of a tensor is dropped.
                    let _state = self.pop()?;
                    match self.stack.last() {
                        Some(Value::Dict(_) | Value::Tensor(_)) => {}
                        v => {
                            let found = v.map_or("nothing".into(), |v| v.kind());
                            return Err(format!("BUILD on a {found} is not allowed"));
                        }
                    }
                }
                BINPERSID => {
                    let pid = self.pop()?;
                    let s = persistent_load(&pid)?;
                    self.storages.push(s.clone());
                    self.stack.push(Value::Storage(Rc::new(s)));
                }
                PERSID => {
                    let id = self.line()?;
                    return Err(format!("text persistent id `{id}` is not a torch storage"));
                }
                INST => {
                    let (module, name) = (self.line()?, self.line()?);
                    Global::lookup(&module, &name)?;
                    return Err(format!("INST of `{module}.{name}` is not allowed"));
                }
                OBJ | NEWOBJ | NEWOBJ_EX => {
                    let items = match op {
                        OBJ => self.pop_mark()?,
                        NEWOBJ => self.pop_n(2)?,
                        _ => self.pop_n(3)?,
                    };
                    let found = items.first().map_or("nothing".into(), Value::kind);
                    return Err(format!("creating an object of {found} is not allowed"));
                }
                _ => return Err(format!("unknown or unsupported pickle opcode 0x{op:02x}")),
            }
        }
    }
}
