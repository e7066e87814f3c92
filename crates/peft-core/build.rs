//! With the `cuda` feature, compiles the project's kernels (kernels/*.cu at the workspace root) to
//! PTX with nvcc; `scripts/install-cuda-toolkit.sh` installs one. Without it, does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let kernels = manifest.join("../../kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    println!("cargo::rerun-if-env-changed=PEFT_RS_CUDA_ARCH");
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // PTX for a virtual architecture is JIT-compiled by the driver for the actual GPU: compute_80
    // runs on Ampere and Hopper alike.
    let arch = std::env::var("PEFT_RS_CUDA_ARCH").unwrap_or_else(|_| "compute_80".into());
    // One PTX module: every kernel the ops load (crates/peft-core/src/cuda.rs).
    let src = kernels.join("peft_ops.cu");
    println!("cargo::rerun-if-changed={}", src.display());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}")])
        .arg("-o")
        .arg(out.join("peft_ops.ptx"))
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/install-cuda-toolkit.sh and eval its --env output",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {}", src.display());
}
