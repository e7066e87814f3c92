//! A safe reader for PyTorch checkpoints (`.pth`, `.pt`, `.bin`) written by
//! `torch.save(state_dict)`, in the zip format (the default since torch 1.6) and the legacy
//! non-zip format.
//!
//! # Formats
//!
//! - Zip: `<archive>/data.pkl` holds the object, each storage is the entry `<archive>/data/<key>`
//!   (stored uncompressed, as torch writes it); a `byteorder` entry saying `big` is refused.
//! - Legacy: the pickles of the magic number, the format version (1001), the system info
//!   (`little_endian: False` is refused), the object and the list of storage keys, then each
//!   storage as an 8-byte little-endian element count, checked against the pickle, and its data.
//!
//! # Safety of the pickle
//!
//! A checkpoint's object is a Python pickle, and unpickling with Python can run any code the file
//! names. This module has its own small unpickler that never imports or calls anything: it
//! interprets the opcodes `torch.save` emits (protocol 2) and accepts only these globals, each
//! turned into a plain record:
//!
//! - `collections.OrderedDict` (called with no arguments: an empty dict),
//! - `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter` and `_rebuild_parameter_with_state`
//!   (a strided view into a storage; a parameter is read as its tensor),
//! - the storage types `torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage`
//!   and `torch.UntypedStorage` (bytes, as torch reads it), named in persistent ids,
//! - the dtypes `torch.float32` and friends, as inert values.
//!
//! Every other global (`GLOBAL`, `STACK_GLOBAL`, `INST`) is refused with its name, as are object
//! construction (`OBJ`, `NEWOBJ`) and `BUILD` on anything but a dict or a tensor (whose state is
//! ignored, e.g. an `OrderedDict`'s `_metadata`). A checkpoint holds only tensors, storages and
//! dicts, so this is all a state dict needs, and nothing in the file can run.
//!
//! Reading never panics on a malformed file: lengths are checked against the bytes present before
//! anything is allocated, containers nest at most 64 deep, the work per pickle is bounded by its
//! size, and every tensor view is checked against its storage before it is copied. A view larger
//! than its storage (stride 0, from `expand`) may take at most 64 MiB, and all tensors together
//! at most four times the file size plus 64 MiB (views shared by several names, such as tied
//! weights, are built once and count once).
//!
//! # What comes out
//!
//! The top-level object must be a dict. When its value under `state_dict` (or else `model`) is a
//! dict holding tensors, as in training checkpoints, only that dict is read. Nested dicts are
//! flattened with dots (`{"block": {"w": t}}` gives `block.w`); int keys are written in decimal.
//! Everything that is not a tensor or a dict (ints such as `epoch`, strings, lists, `None`) is
//! skipped. Tensors come in file (dict insertion) order, on the CPU, contiguous, in the stored
//! dtype where candle has it: `int8` is widened to `i16` and `bool` is read as `u8` 0/1.

mod dtype;
mod legacy;
mod opcodes;
mod pickle;
mod tensor;
mod value;
mod zipfmt;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_core::Tensor;
use peft_core::{PeftError, Result};

/// Errors inside the module, as messages; [`read_pth`] adds the path.
type Res<T> = std::result::Result<T, String>;

const NOT_A_CHECKPOINT: &str =
    "not a PyTorch checkpoint (neither a zip archive nor a pickle with the legacy magic number)";

/// Reads every tensor of a PyTorch checkpoint written by `torch.save(state_dict)`: the zip format
/// (default since torch 1.6) and the legacy non-zip format; names and tensors in file order, on
/// the CPU, in the stored dtype (see the [module docs](self) for what is accepted).
///
/// Errors are [`PeftError::Io`] naming the file and what is wrong with it; a pickle that names
/// anything but tensors, storages and dicts is refused without running anything.
pub fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    read(path).map_err(|message| PeftError::io(path, message))
}

fn read(path: &Path) -> Res<Vec<(String, Tensor)>> {
    if cfg!(target_endian = "big") {
        return Err("reading PyTorch checkpoints needs a little-endian host".into());
    }
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(4);
    (&mut file)
        .take(4)
        .read_to_end(&mut head)
        .map_err(|e| e.to_string())?;
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        let file = File::open(path).map_err(|e| e.to_string())?;
        zipfmt::read(file)
    } else if head.first() == Some(&0x80) {
        let mut data = head;
        file.read_to_end(&mut data).map_err(|e| e.to_string())?;
        legacy::read(&data)
    } else {
        Err(NOT_A_CHECKPOINT.into())
    }
}
