//! Intel MKL's f32 GEMM, loaded at run time when the user installed it
//! (`scripts/install-mkl.sh`, from the `mkl` wheel on PyPI) and pointed `PEFT_RS_MKL` at its
//! `libmkl_rt.so.2`. Nothing links against MKL: without it (or with `PEFT_RS_MKL=off`) every
//! product stays on the `gemm` crate. MKL runs sequentially; [`super::gemm`] splits the rows of a
//! product over rayon's threads itself, so that there is one thread pool.
//!
//! Measured here (2 threads, `cblas_sgemm` on row halves): 245-260 GFLOP/s at BERT shapes against
//! about 200 for the `gemm` crate; on skinny products (one side ≤ 16) the `gemm` crate is faster,
//! so those never come here.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;

use super::gemm::{MatMut, MatRef};

/// The environment variable naming `libmkl_rt.so.2` (or `off`).
pub const MKL_ENV: &str = "PEFT_RS_MKL";

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
/// `MKL_THREADING_SEQUENTIAL` for `MKL_Set_Threading_Layer`.
const SEQUENTIAL: c_int = 1;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type SetThreadingLayer = unsafe extern "C" fn(c_int) -> c_int;

/// The loaded library: where it came from and its `cblas_sgemm`.
struct Mkl {
    path: String,
    sgemm: Sgemm,
}

static MKL: OnceLock<Result<Mkl, String>> = OnceLock::new();

#[cfg(unix)]
fn symbol(handle: *mut c_void, name: &str) -> Option<*mut c_void> {
    let name = CString::new(name).ok()?;
    // SAFETY: `handle` is a live dlopen handle and `name` a NUL-terminated string.
    let p = unsafe { libc::dlsym(handle, name.as_ptr() as *const c_char) };
    (!p.is_null()).then_some(p)
}

#[cfg(unix)]
fn load() -> Result<Mkl, String> {
    let path = match std::env::var(MKL_ENV) {
        Ok(p) if p == "off" || p.is_empty() => return Err(format!("{MKL_ENV}=off")),
        Ok(p) => p,
        Err(_) => return Err(format!("{MKL_ENV} is not set")),
    };
    let c_path = CString::new(path.clone()).map_err(|_| format!("{MKL_ENV}: bad path"))?;
    // SAFETY: dlopen of a path; the handle is kept for the life of the process (never closed).
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated message owned by libc (or null).
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("{MKL_ENV}={path}: {why}"));
    }
    let missing = |name: &str| format!("{path}: no `{name}` (is it libmkl_rt?)");
    let layer = symbol(handle, "MKL_Set_Threading_Layer").ok_or_else(|| missing("layer"))?;
    let sgemm = symbol(handle, "cblas_sgemm").ok_or_else(|| missing("cblas_sgemm"))?;
    // SAFETY: both symbols are MKL's C functions of these signatures (mkl_service.h, mkl_cblas.h);
    // the threading layer is set before any other MKL call, as MKL requires.
    unsafe {
        let set_layer: SetThreadingLayer = std::mem::transmute(layer);
        set_layer(SEQUENTIAL);
        Ok(Mkl {
            path,
            sgemm: std::mem::transmute::<*mut c_void, Sgemm>(sgemm),
        })
    }
}

#[cfg(not(unix))]
fn load() -> Result<Mkl, String> {
    Err("MKL is loaded on Unix only".into())
}

fn mkl() -> Option<&'static Mkl> {
    MKL.get_or_init(load).as_ref().ok()
}

/// Which f32 GEMM runs: `mkl (<path>)`, or `gemm crate` with why MKL is not used.
pub fn f32_gemm_backend() -> String {
    match MKL.get_or_init(load) {
        Ok(m) => format!("mkl ({})", m.path),
        Err(why) => format!("gemm crate ({why})"),
    }
}

/// `(transpose flag, leading dimension)` of a view with one unit stride, as row-major CBLAS
/// takes it; `None` when neither stride is 1.
fn cblas_layout(m: &MatRef<'_>) -> Option<(c_int, c_int)> {
    if m.col_stride == 1 || m.cols <= 1 {
        Some((NO_TRANS, m.row_stride.max(m.cols).max(1) as c_int))
    } else if m.row_stride == 1 || m.rows <= 1 {
        Some((TRANS, m.col_stride.max(m.rows).max(1) as c_int))
    } else {
        None
    }
}

/// Whether MKL takes this product: loaded, no side skinny, both operands with a unit stride.
pub(super) fn takes(lhs: &MatRef<'_>, rhs: &MatRef<'_>) -> bool {
    lhs.rows.min(lhs.cols).min(rhs.cols) > 16
        && cblas_layout(lhs).is_some()
        && cblas_layout(rhs).is_some()
        && mkl().is_some()
}

/// `dst = scale·lhs·rhs` (or `dst += …`) on the calling thread; the caller checked [`takes`] and
/// that every view fits its slice.
pub(super) fn sgemm(
    dst: MatMut<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    accumulate: bool,
) {
    let (Some(mkl), Some((ta, lda)), Some((tb, ldb))) =
        (mkl(), cblas_layout(&lhs), cblas_layout(&rhs))
    else {
        unreachable!("sgemm called on a product `takes` refused")
    };
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the caller checked that each view's last element lies inside its slice; CBLAS
    // reads `lhs`/`rhs` and writes `dst` within those bounds (row-major, the leading dimensions
    // above), and with beta 0 it does not read dst.
    unsafe {
        (mkl.sgemm)(
            ROW_MAJOR,
            ta,
            tb,
            lhs.rows as c_int,
            rhs.cols as c_int,
            lhs.cols as c_int,
            scale,
            lhs.data.as_ptr(),
            lda,
            rhs.data.as_ptr(),
            ldb,
            beta,
            dst.data.as_mut_ptr(),
            dst.row_stride.max(1) as c_int,
        );
    }
}
