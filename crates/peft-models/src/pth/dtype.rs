//! The element types of torch storages, and the candle dtypes they are read as.

use candle_core::DType;

/// Element types of torch storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    /// Each type with its storage class name and dtype name.
    const ALL: [(Self, &'static str, &'static str); 10] = [
        (Self::F64, "DoubleStorage", "float64"),
        (Self::F32, "FloatStorage", "float32"),
        (Self::F16, "HalfStorage", "float16"),
        (Self::BF16, "BFloat16Storage", "bfloat16"),
        (Self::I64, "LongStorage", "int64"),
        (Self::I32, "IntStorage", "int32"),
        (Self::I16, "ShortStorage", "int16"),
        (Self::I8, "CharStorage", "int8"),
        (Self::U8, "ByteStorage", "uint8"),
        (Self::Bool, "BoolStorage", "bool"),
    ];

    pub(crate) fn from_storage_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|e| e.1 == name).map(|e| e.0)
    }

    pub(crate) fn from_dtype_name(name: &str) -> Option<Self> {
        let name = match name {
            "double" => "float64",
            "float" => "float32",
            "half" => "float16",
            "long" => "int64",
            "int" => "int32",
            "short" => "int16",
            n => n,
        };
        Self::ALL.iter().find(|e| e.2 == name).map(|e| e.0)
    }

    /// The torch name of the dtype, e.g. `float32`.
    pub(crate) fn name(self) -> &'static str {
        Self::ALL.iter().find(|e| e.0 == self).map_or("?", |e| e.2)
    }

    /// Bytes per element in the file.
    pub(crate) fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The candle dtype a storage type is read as: the same type where candle has it, `i8`
    /// widened to `i16` and `bool` as `u8` 0/1 (candle has neither), both exact.
    pub(crate) fn candle(self) -> DType {
        match self {
            Self::F64 => DType::F64,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I64 => DType::I64,
            Self::I32 => DType::I32,
            Self::I16 | Self::I8 => DType::I16,
            Self::U8 | Self::Bool => DType::U8,
        }
    }
}
