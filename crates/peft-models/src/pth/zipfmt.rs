//! The zip format of `torch.save` (the default since torch 1.6): `<archive>/data.pkl` holds the
//! object, with persistent ids `('storage', storage_type, key, location, numel)`, and each storage
//! is the stored (uncompressed) entry `<archive>/data/<key>`, little-endian unless
//! `<archive>/byteorder` says otherwise.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};

use candle_core::Tensor;
use zip::ZipArchive;

use super::tensor::{self, Storages};
use super::{pickle, Res};

type Archive = ZipArchive<BufReader<File>>;

/// Reads the whole entry `name`, refusing a declared size larger than the file.
fn read_entry(zip: &mut Archive, name: &str, file_len: u64) -> Res<Vec<u8>> {
    let mut f = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    let size = f.size();
    if size > file_len {
        return Err(format!(
            "truncated: {name} declares {size} bytes, the file has {file_len}"
        ));
    }
    let mut buf = Vec::with_capacity(size as usize);
    f.read_to_end(&mut buf)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(buf)
}

struct ZipStorages {
    zip: Archive,
    prefix: String,
    file_len: u64,
    cache: HashMap<String, Vec<u8>>,
}

impl Storages for ZipStorages {
    fn bytes(&mut self, key: &str) -> Res<&[u8]> {
        if !self.cache.contains_key(key) {
            let name = format!("{}data/{key}", self.prefix);
            let bytes = read_entry(&mut self.zip, &name, self.file_len)?;
            self.cache.insert(key.to_string(), bytes);
        }
        self.cache
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("storage {key} not read"))
    }

    fn release(&mut self, key: &str) {
        self.cache.remove(key);
    }
}

/// Reads the tensors of a zip checkpoint.
pub(crate) fn read(file: File) -> Res<Vec<(String, Tensor)>> {
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = ZipArchive::new(BufReader::new(file))
        .map_err(|e| format!("not a readable zip archive (truncated or corrupt): {e}"))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .map(|n| n.into_owned())
        .collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or("the zip archive has no <archive>/data.pkl: not a PyTorch checkpoint")?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let order = format!("{prefix}byteorder");
    if names.contains(&order) {
        let bytes = read_entry(&mut zip, &order, file_len)?;
        match bytes.as_slice() {
            b"little" => {}
            b"big" => return Err("big-endian checkpoints are not supported".into()),
            b => {
                return Err(format!(
                    "unknown byteorder {:?}",
                    String::from_utf8_lossy(b)
                ))
            }
        }
    }
    let data = read_entry(&mut zip, pkl, file_len)?;
    let loaded = pickle::load(&data, 0).map_err(|e| format!("{pkl}: {e}"))?;
    let entries = tensor::named_tensors(&loaded.value, data.len())?;
    let budget = tensor::memory_budget(usize::try_from(file_len).unwrap_or(usize::MAX));
    let mut src = ZipStorages {
        zip,
        prefix,
        file_len,
        cache: HashMap::new(),
    };
    tensor::materialize(entries, &mut src, budget)
}
