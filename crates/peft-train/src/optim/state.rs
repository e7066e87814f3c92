//! AdamW state as named tensors, for checkpoint and resume.
//!
//! For a parameter `name` that has taken at least one step the state holds
//! `name.exp_avg` and `name.exp_avg_sq` (the parameter's shape, dtype and device) and
//! `name.step` (a rank-0 `i64` on the CPU), the names of PyTorch's AdamW state.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::{AdamW, Moments};
use crate::error::{CandleContext, Result, TrainError};

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";

fn state_error(key: &str, message: impl Into<String>) -> TrainError {
    TrainError::OptimizerState {
        key: key.to_string(),
        message: message.into(),
    }
}

impl AdamW {
    /// A snapshot of the state: copies, unaffected by later steps.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for slot in &self.slots {
            let Some(st) = &slot.state else { continue };
            let n = &slot.name;
            let copy = |t: &Tensor| t.force_contiguous().map(|t| t.detach());
            let m = copy(&st.m).ctx(|| format!("copying state of `{n}`"))?;
            let v = copy(&st.v).ctx(|| format!("copying state of `{n}`"))?;
            let step =
                Tensor::new(st.step as i64, &Device::Cpu).ctx(|| format!("state step of `{n}`"))?;
            out.insert(format!("{n}.{EXP_AVG}"), m);
            out.insert(format!("{n}.{EXP_AVG_SQ}"), v);
            out.insert(format!("{n}.{STEP}"), step);
        }
        Ok(out)
    }

    /// Restores state saved by [`AdamW::state_tensors`].
    ///
    /// Parameters without entries start fresh. Every entry must belong to a known parameter,
    /// come with its two siblings and match the parameter's shape; tensors are copied to the
    /// parameter's dtype and device. Nothing changes unless all of it fits.
    pub fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut used = 0;
        let mut loaded = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let n = &slot.name;
            let key = |s: &str| format!("{n}.{s}");
            let parts = [EXP_AVG, EXP_AVG_SQ, STEP].map(|s| state.get(&key(s)));
            let [Some(m), Some(v), Some(step)] = parts else {
                if let Some(i) = parts.iter().position(Option::is_some) {
                    let missing = parts.iter().position(Option::is_none).unwrap_or(i);
                    let names = [EXP_AVG, EXP_AVG_SQ, STEP];
                    let msg = format!("present without `{}`", key(names[missing]));
                    return Err(state_error(&key(names[i]), msg));
                }
                loaded.push(None);
                continue;
            };
            used += 3;
            let step = read_step(step, &key(STEP))?;
            let m = fit(m, slot, &key(EXP_AVG))?;
            let v = fit(v, slot, &key(EXP_AVG_SQ))?;
            loaded.push((step > 0).then_some(Moments { m, v, step }));
        }
        if used != state.len() {
            let mut unknown: Vec<&String> = state
                .keys()
                .filter(|k| !self.slots.iter().any(|s| is_state_key(k, &s.name)))
                .collect();
            unknown.sort();
            let key = unknown.first().map_or("?", |k| k.as_str());
            return Err(state_error(
                key,
                "no trainable parameter has this state entry",
            ));
        }
        for (slot, st) in self.slots.iter_mut().zip(loaded) {
            slot.state = st;
        }
        Ok(())
    }
}

fn is_state_key(key: &str, name: &str) -> bool {
    key.strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|s| [EXP_AVG, EXP_AVG_SQ, STEP].contains(&s))
}

/// The step count from a one-element integer or float tensor.
fn read_step(t: &Tensor, key: &str) -> Result<u64> {
    if t.elem_count() != 1 {
        return Err(state_error(
            key,
            format!("expected one value, found shape {:?}", t.dims()),
        ));
    }
    let value = t
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .ctx(|| format!("reading `{key}`"))?[0];
    if !(value >= 0.0 && value.fract() == 0.0 && value < 9.0e15) {
        return Err(state_error(
            key,
            format!("expected a step count, found {value}"),
        ));
    }
    Ok(value as u64)
}

/// A private contiguous copy of a moment on the parameter's dtype and device.
fn fit(t: &Tensor, slot: &super::Slot, key: &str) -> Result<Tensor> {
    if t.dims() != slot.var.dims() {
        let msg = format!(
            "shape {:?} does not match parameter shape {:?}",
            t.dims(),
            slot.var.dims()
        );
        return Err(state_error(key, msg));
    }
    t.to_device(slot.var.device())
        .and_then(|t| t.to_dtype(slot.var.dtype()))
        .and_then(|t| t.force_contiguous())
        .map(|t| t.detach())
        .ctx(|| format!("loading `{key}`"))
}
