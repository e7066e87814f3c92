//! The values the restricted unpickler builds, the allow-list of globals, and what the allowed
//! callables (`REDUCE` targets and persistent ids) turn into.

use std::rc::Rc;

use super::dtype::StorageDtype;
use super::Res;

/// How deep containers may nest (a state dict needs a handful of levels). Bounding this keeps
/// recursion when walking or dropping values shallow.
pub(crate) const MAX_DEPTH: usize = 64;

/// The globals a checkpoint may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    /// `torch.<X>Storage`, or `UntypedStorage` as bytes (`U8`), as torch reads it.
    Storage(StorageDtype),
    /// `torch.float32` and friends.
    DType(StorageDtype),
}

impl Global {
    /// Looks a global up in the allow-list; anything else is refused with its name.
    pub(crate) fn lookup(module: &str, name: &str) -> Res<Self> {
        let found = match (module, name) {
            ("collections", "OrderedDict") => Some(Self::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Self::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Some(Self::RebuildParameter),
            ("torch._utils", "_rebuild_parameter_with_state") => {
                Some(Self::RebuildParameterWithState)
            }
            ("torch" | "torch.storage", "UntypedStorage") => Some(Self::Storage(StorageDtype::U8)),
            ("torch", n) => StorageDtype::from_storage_name(n)
                .map(Self::Storage)
                .or_else(|| StorageDtype::from_dtype_name(n).map(Self::DType)),
            _ => None,
        };
        found.ok_or_else(|| {
            format!(
                "pickle global `{module}.{name}` is not allowed: a checkpoint may hold only \
                 tensors, storages and (ordered) dicts"
            )
        })
    }

    fn name(self) -> String {
        match self {
            Self::OrderedDict => "collections.OrderedDict".into(),
            Self::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Self::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Self::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state".into(),
            Self::Storage(d) => format!("torch storage of {}", d.name()),
            Self::DType(d) => format!("torch.{}", d.name()),
        }
    }
}

/// A storage named by a persistent id: its file key, element type and length in elements, and for
/// legacy views the `(offset, length)` window into it.
#[derive(Clone, Debug)]
pub(crate) struct StorageRef {
    pub key: Rc<str>,
    pub dtype: StorageDtype,
    pub numel: usize,
    pub view: Option<(usize, usize)>,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view into a storage.
#[derive(Clone, Debug)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// Items of a list or tuple, or of a dict as alternating keys and values, with the nesting depth.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seq {
    pub items: Vec<Value>,
    pub depth: usize,
}

impl Seq {
    pub(crate) fn from_vec(items: Vec<Value>) -> Res<Self> {
        let mut s = Self::default();
        s.extend(items)?;
        Ok(s)
    }

    pub(crate) fn extend(&mut self, items: Vec<Value>) -> Res<()> {
        let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        if depth > MAX_DEPTH {
            return Err(format!(
                "pickle nests containers deeper than {MAX_DEPTH} levels"
            ));
        }
        self.depth = self.depth.max(depth);
        self.items.extend(items);
        Ok(())
    }

    /// The `(key, value)` pairs of a dict.
    pub(crate) fn pairs(&self) -> impl Iterator<Item = (&Value, &Value)> {
        self.items.chunks_exact(2).map(|p| (&p[0], &p[1]))
    }
}

/// A value on the unpickler's stack.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as little-endian two's complement bytes.
    BigInt(Rc<[u8]>),
    /// A float (its value is never needed).
    Float,
    Str(Rc<str>),
    /// Bytes (their value is never needed).
    Bytes,
    List(Rc<Seq>),
    Tuple(Rc<Seq>),
    Dict(Rc<Seq>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub(crate) fn depth(&self) -> usize {
        match self {
            Self::List(s) | Self::Tuple(s) | Self::Dict(s) => s.depth,
            _ => 0,
        }
    }

    /// A short name of the kind of value, for error messages.
    pub(crate) fn kind(&self) -> String {
        match self {
            Self::None => "None".into(),
            Self::Bool(_) => "bool".into(),
            Self::Int(_) | Self::BigInt(_) => "int".into(),
            Self::Float => "float".into(),
            Self::Str(_) => "str".into(),
            Self::Bytes => "bytes".into(),
            Self::List(_) => "list".into(),
            Self::Tuple(_) => "tuple".into(),
            Self::Dict(_) => "dict".into(),
            Self::Global(g) => format!("`{}`", g.name()),
            Self::Storage(_) => "storage".into(),
            Self::Tensor(_) => "tensor".into(),
        }
    }

    fn index(&self, what: &str) -> Res<usize> {
        match self {
            Self::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} {i} is negative")),
            v => Err(format!("{what} must be an int, found {}", v.kind())),
        }
    }

    fn indices(&self, what: &str) -> Res<Vec<usize>> {
        match self {
            Self::Tuple(s) | Self::List(s) => s.items.iter().map(|v| v.index(what)).collect(),
            v => Err(format!("tensor {what} must be a tuple, found {}", v.kind())),
        }
    }
}

/// What `REDUCE` with an allowed callable builds.
pub(crate) fn reduce(callable: Global, args: &Value) -> Res<Value> {
    let Value::Tuple(args) = args else {
        return Err(format!(
            "REDUCE arguments must be a tuple, found {}",
            args.kind()
        ));
    };
    let args = &args.items;
    let tensor_arg = || match args.first() {
        Some(Value::Tensor(t)) => Ok(Value::Tensor(t.clone())),
        _ => Err(format!("`{}` expects a tensor", callable.name())),
    };
    match callable {
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Rc::default())),
        Global::RebuildTensorV2 => rebuild_tensor(args),
        Global::RebuildParameter if args.len() == 3 => tensor_arg(),
        Global::RebuildParameterWithState if args.len() == 4 => tensor_arg(),
        g => Err(format!(
            "calling `{}` with {} arguments is not supported",
            g.name(),
            args.len()
        )),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[,
/// metadata])`.
fn rebuild_tensor(args: &[Value]) -> Res<Value> {
    let [storage, offset, shape, stride, _requires_grad, _hooks, ..] = args else {
        return Err(format!(
            "_rebuild_tensor_v2 expects 6 or 7 arguments, found {}",
            args.len()
        ));
    };
    if args.len() > 7 {
        return Err(format!(
            "_rebuild_tensor_v2 expects 6 or 7 arguments, found {}",
            args.len()
        ));
    }
    let Value::Storage(storage) = storage else {
        return Err(format!(
            "_rebuild_tensor_v2 expects a storage, found {}",
            storage.kind()
        ));
    };
    let (shape, stride) = (shape.indices("size")?, stride.indices("stride")?);
    if shape.len() != stride.len() {
        return Err(format!(
            "tensor size {shape:?} and stride {stride:?} differ in length"
        ));
    }
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: StorageRef::clone(storage),
        offset: offset.index("storage offset")?,
        shape,
        stride,
    })))
}

/// Resolves a persistent id: `('storage', storage_type, key, location, numel)` in the zip format,
/// plus a `view_metadata` (`None` or `(view_key, offset, size)`) in the legacy format.
pub(crate) fn persistent_load(pid: &Value) -> Res<StorageRef> {
    let bad = || {
        format!(
            "persistent id {} is not a torch storage reference",
            pid.kind()
        )
    };
    let Value::Tuple(t) = pid else {
        return Err(bad());
    };
    let (head, view) = match t.items.as_slice() {
        [a, b, c, d, e] => ([a, b, c, d, e], None),
        [a, b, c, d, e, v] => ([a, b, c, d, e], Some(v)),
        _ => return Err(bad()),
    };
    let [Value::Str(tag), Value::Global(Global::Storage(dtype)), key, Value::Str(_), numel] = head
    else {
        return Err(bad());
    };
    if &**tag != "storage" {
        return Err(format!(
            "persistent id of type `{tag}` is not a torch storage"
        ));
    }
    let key: Rc<str> = match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string().into(),
        v => return Err(format!("storage key must be a str, found {}", v.kind())),
    };
    let view = match view {
        None | Some(Value::None) => None,
        Some(Value::Tuple(v)) => match v.items.as_slice() {
            [_, offset, size] => Some((offset.index("view offset")?, size.index("view size")?)),
            _ => return Err(bad()),
        },
        Some(v) => return Err(format!("storage view must be a tuple, found {}", v.kind())),
    };
    Ok(StorageRef {
        key,
        dtype: *dtype,
        numel: numel.index("storage size")?,
        view,
    })
}
