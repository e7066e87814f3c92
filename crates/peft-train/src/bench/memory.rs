//! Peak memory of one benchmark case: the process's peak RSS on the CPU, the CUDA default memory
//! pool's high-water mark on a GPU (candle allocates stream-ordered from that pool). Best effort:
//! `None` where the platform does not tell.

use candle_core::Device;

/// Measures the peak from [`PeakMeter::start`] to [`PeakMeter::peak`].
pub struct PeakMeter {
    device: Device,
}

impl PeakMeter {
    /// Resets the high-water mark of `device`'s memory.
    pub fn start(device: &Device) -> Self {
        match device {
            Device::Cpu => {
                // Earlier cases' freed buffers, kept by the allocator, would count as this case's.
                peft_core::device::release_freed_cpu_buffers();
                // "5" resets the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0).
                let _ = std::fs::write("/proc/self/clear_refs", "5");
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let _ = cuda_pool::reset(dev);
            }
            _ => {}
        }
        Self {
            device: device.clone(),
        }
    }

    /// The peak since `start`, in bytes.
    pub fn peak(&self) -> Option<u64> {
        match &self.device {
            Device::Cpu => {
                let status = std::fs::read_to_string("/proc/self/status").ok()?;
                let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
                let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kb * 1024)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => cuda_pool::high_water_mark(dev),
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;

    fn pool(dev: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // Safety: plain driver queries on a bound context with valid out-pointers.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    pub fn reset(dev: &CudaDevice) -> Option<()> {
        dev.cuda_stream().synchronize().ok()?;
        let pool = pool(dev)?;
        let mut zero: u64 = 0;
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(())
    }

    pub fn high_water_mark(dev: &CudaDevice) -> Option<u64> {
        dev.cuda_stream().synchronize().ok()?;
        let pool = pool(dev)?;
        let mut value: u64 = 0;
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut value as *mut u64 as *mut _,
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS && value > 0).then_some(value)
    }
}
