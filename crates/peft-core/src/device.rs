//! The one place a device is chosen from its name, so that GPUs plug in without model changes.

use candle_core::Device;

use crate::error::{PeftError, Result};

/// Parses `cpu`, `cuda` or `cuda:N` into a device.
pub fn parse_device(name: &str) -> Result<Device> {
    let bad = |message: String| PeftError::Config {
        key: "model.device".into(),
        message,
    };
    match name.trim() {
        "cpu" => Ok(Device::Cpu),
        other => {
            let ordinal = match other.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| bad(format!("`{other}` is not `cuda:N`")))?,
                None => {
                    return Err(bad(format!(
                        "unknown device `{other}` (expected `cpu` or `cuda:N`)"
                    )))
                }
            };
            Device::new_cuda(ordinal).map_err(|e| bad(format!("`{other}` is not available: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_refuses_nonsense() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("model.device") && err.contains("tpu"), "{err}");
        assert!(parse_device("cuda:x").is_err());
    }
}
