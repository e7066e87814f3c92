//! `read_pth` against fixtures written by tests/fixtures/pth/gen_pth_fixtures.py (torch 2.15): the
//! zip and legacy formats, a training checkpoint, malicious pickles, truncated and corrupted files;
//! and against the torchvision MobileNetV2 checkpoint in the torch hub cache when it is there
//! (without it that test prints a note and passes, unless PEFT_RS_REQUIRE_ASSETS=1).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use peft_models::read_pth;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pth")
        .join(name)
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn values(t: &Tensor) -> Vec<f64> {
    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    t.to_vec1::<f64>().unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// Checks names (in order), candle dtypes, shapes and values against expected.json.
fn check(got: &[(String, Tensor)], want: &Value) {
    let want = want.as_array().unwrap();
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, want_names);
    for ((name, t), w) in got.iter().zip(want) {
        assert_eq!(t.dtype().as_str(), w["dtype"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        let want_values: Vec<f64> = serde_json::from_value(w["values"].clone()).unwrap();
        let got_values = values(t);
        assert_eq!(got_values.len(), want_values.len(), "{name}");
        for (i, (a, b)) in got_values.iter().zip(&want_values).enumerate() {
            assert!(close(*a, *b, 1e-12), "{name}[{i}]: {a} != {b}");
        }
    }
}

#[test]
fn zip_format_matches_torch() {
    let got = read_pth(&fixture("tensors.pth")).unwrap();
    check(&got, &json("expected.json")["tensors"]);
    let scalar = &got
        .iter()
        .find(|(n, _)| n == "bn.num_batches_tracked")
        .unwrap()
        .1;
    assert_eq!(scalar.rank(), 0);
    assert_eq!(scalar.to_scalar::<i64>().unwrap(), 7);
}

#[test]
fn legacy_format_matches_torch() {
    let got = read_pth(&fixture("tensors_legacy.pth")).unwrap();
    check(&got, &json("expected.json")["tensors"]);
}

#[test]
fn training_checkpoint_gives_the_model_state_dict() {
    let got = read_pth(&fixture("checkpoint.pt")).unwrap();
    check(&got, &json("expected.json")["checkpoint"]);
}

const MARKER: &str = "/tmp/peft_rs_pth_pwned";

#[test]
fn malicious_pickles_are_refused_without_running() {
    let _ = std::fs::remove_file(MARKER);
    for (file, global) in [
        ("evil_os_system.pth", "posix.system"),
        ("evil_eval_legacy.pth", "__builtin__.eval"),
        ("evil_class.pth", "__main__.Evil"),
        ("evil_raw.pkl", "posix.system"),
    ] {
        let err = read_pth(&fixture(file)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("`{global}` is not allowed")),
            "{file}: {err}"
        );
        assert!(
            err.contains(file),
            "{file}: the error names the file: {err}"
        );
        assert!(!Path::new(MARKER).exists(), "{file}: the payload ran");
    }
}

#[test]
fn a_huge_broadcast_view_is_refused() {
    let err = read_pth(&fixture("expand_huge.pth"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("broadcast view of 4294967296 bytes"), "{err}");
}

/// Writes `bytes` as a checkpoint in `dir` and reads it back.
fn read_bytes(dir: &Path, bytes: &[u8]) -> peft_core::Result<Vec<(String, Tensor)>> {
    let path = dir.join("x.pth");
    // A fresh file each time: rewriting one in place makes ext4 flush it to disk, slowly.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).unwrap();
    read_pth(&path)
}

#[test]
fn unreadable_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |bytes: &[u8]| read_bytes(dir.path(), bytes).unwrap_err().to_string();
    assert!(err(b"hello").contains("not a PyTorch checkpoint"));
    assert!(err(b"").contains("not a PyTorch checkpoint"));
    // A pickle without the legacy magic number.
    assert!(err(b"\x80\x02K\x01.").contains("not a PyTorch checkpoint"));
    let e = err(b"\x80\x02\xff");
    assert!(e.contains("opcode 0xff") && e.contains("byte 2"), "{e}");
    // Deep nesting is refused, not a stack overflow.
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(std::iter::repeat_n(b'a', 99_999));
    deep.push(b'.');
    assert!(err(&deep).contains("deeper than"));
    // A list appended to itself through the memo, then returned.
    assert!(err(b"\x80\x02]q\x00h\x00a.").contains("not a PyTorch checkpoint"));
    let missing = dir.path().join("missing.pth");
    let e = read_pth(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.pth"), "{e}");
}

/// A legacy checkpoint around `main`, a pickle (without PROTO and STOP) of an object without
/// tensors.
fn legacy_bytes(main: &[u8]) -> Vec<u8> {
    let mut b = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    b.extend(b"\x80\x02M\xe9\x03.\x80\x02}.\x80\x02");
    b.extend(main);
    b.extend(b".\x80\x02].");
    b
}

#[test]
fn hostile_pickles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = |main: &[u8]| {
        read_bytes(dir.path(), &legacy_bytes(main))
            .unwrap_err()
            .to_string()
    };
    // The frame is right: an empty dict reads as no tensors.
    assert!(read_bytes(dir.path(), &legacy_bytes(b"}"))
        .unwrap()
        .is_empty());
    // d[i+1] = {"a": d[i], "b": d[i]} sixty times: 2^60 paths through a few hundred bytes.
    let mut dag = b"}".to_vec();
    for _ in 0..60 {
        dag.extend(b"q\x00}\x8c\x01ah\x00s\x8c\x01bh\x00s");
    }
    assert!(err(&dag).contains("shared too often"));
    // A big-endian legacy file.
    let mut big = legacy_bytes(b"}");
    let at = big.windows(4).position(|w| w == b"\x80\x02}.").unwrap();
    big.splice(at..at + 4, *b"\x80\x02}\x8c\x0dlittle_endian\x89s.");
    let e = read_bytes(dir.path(), &big).unwrap_err().to_string();
    assert!(e.contains("big-endian"), "{e}");
    // Object construction, BUILD on a list, a persistent id that is not a storage.
    assert!(err(b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93)\x81").contains("not allowed"));
    assert!(err(b"]}b").contains("BUILD on a list is not allowed"));
    assert!(err(b"(\x8c\x06module\x8c\x01xtQ").contains("not a torch storage"));
    // A storage the pickle names but the file does not hold.
    let storage = b"(\x8c\x07storagectorch\nFloatStorage\n\x8c\x010\x8c\x03cpuK\x04Nt";
    let mut t = b"}\x8c\x01wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    t.extend(storage);
    t.extend(b"QK\x00K\x04\x85K\x01\x85\x89}tRs");
    assert!(err(&t).contains("storage 0 is missing"), "{}", err(&t));
}

#[test]
fn truncated_files_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tensors.pth", "tensors_legacy.pth", "checkpoint.pt"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for len in 0..bytes.len() {
            assert!(
                read_bytes(dir.path(), &bytes[..len]).is_err(),
                "{name} cut to {len}"
            );
        }
    }
    let bytes = std::fs::read(fixture("tensors_legacy.pth")).unwrap();
    let e = read_bytes(dir.path(), &bytes[..bytes.len() - 1]).unwrap_err();
    assert!(e.to_string().contains("truncated: storage"), "{e}");
}

/// xorshift64*: reproducible corruption without a dependency.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn corrupted_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    for (name, seeds) in [("tensors_legacy.pth", 10_000), ("tensors.pth", 2000)] {
        let original = std::fs::read(fixture(name)).unwrap();
        for seed in 0..seeds {
            let mut next = rng(seed);
            let mut bytes = original.clone();
            for _ in 0..=next() % 8 {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = next() as u8;
            }
            let read = std::panic::catch_unwind(|| {
                let _ = read_bytes(dir.path(), &bytes);
            });
            assert!(read.is_ok(), "{name}: seed {seed} panicked");
        }
    }
}

#[test]
fn random_opcode_streams_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ops: &[u8] = b"(]})tlduseaKMJqhrjNRbQ.\x85\x86\x87\x88\x89\x8a\x94XC";
    for seed in 0..10_000 {
        let mut next = rng(seed + 1_000_000);
        let mut bytes = b"\x80\x02".to_vec();
        for _ in 0..next() % 200 {
            bytes.push(ops[(next() % ops.len() as u64) as usize]);
            for _ in 0..next() % 3 {
                bytes.push((next() % 4) as u8);
            }
        }
        let read = std::panic::catch_unwind(|| {
            let _ = read_bytes(dir.path(), &bytes);
        });
        assert!(read.is_ok(), "seed {seed} panicked");
    }
}

fn mobilenet_path() -> Option<PathBuf> {
    let path = peft_models::torch_hub_checkpoints().join("mobilenet_v2-b0353104.pth");
    path.exists().then_some(path)
}

#[test]
fn mobilenet_v2_checkpoint_matches_torch() {
    let Some(path) = mobilenet_path() else {
        let note = "mobilenet_v2-b0353104.pth is not in the torch hub cache";
        if std::env::var("PEFT_RS_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
            panic!("{note} (scripts/setup-assets.sh)");
        }
        eprintln!("skipping: {note}");
        return;
    };
    let got = read_pth(&path).unwrap();
    let want = json("mobilenet_v2_expected.json");
    assert_eq!(got.len(), 314);
    assert_eq!(want["count"], 314);
    let shape = |name: &str| {
        got.iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .dims()
            .to_vec()
    };
    assert_eq!(shape("features.0.0.weight"), [32, 3, 3, 3]);
    assert_eq!(shape("classifier.1.weight"), [1000, 1280]);
    for ((name, t), w) in got.iter().zip(want["tensors"].as_array().unwrap()) {
        assert_eq!(name, w[0].as_str().unwrap());
        let dims: Vec<usize> = serde_json::from_value(w[1].clone()).unwrap();
        assert_eq!(t.dims(), dims.as_slice(), "{name}");
        let dtype = if w[2] == "int64" {
            DType::I64
        } else {
            DType::F32
        };
        assert_eq!(t.dtype(), dtype, "{name}");
        let v = values(t);
        let sum: f64 = v.iter().sum();
        let (want_sum, want_first) = (w[3].as_f64().unwrap(), w[4].as_f64().unwrap());
        assert!(
            close(sum, want_sum, 1e-9),
            "{name}: sum {sum} != {want_sum}"
        );
        assert!(
            close(v[0], want_first, 1e-12),
            "{name}: first {} != {want_first}",
            v[0]
        );
    }
}
