//! Creating the backend never panics: without a driver (CI, laptops) it is a clean error that
//! names what is missing; on a GPU machine it is a working device.

use flux_cuda::{Cuda, CudaError, driver_available};
use flux_kernels::SamplerOps;

#[test]
fn new_is_a_device_or_a_clean_error() {
    let result = std::panic::catch_unwind(Cuda::new);
    let Ok(result) = result else {
        panic!("Cuda::new panicked instead of returning an error");
    };
    match result {
        Ok(cuda) => {
            assert!(driver_available(), "a device opened without a driver");
            assert!(cuda.name().starts_with("cuda:"), "name {}", cuda.name());
        }
        Err(e) => {
            let msg = e.to_string();
            if driver_available() {
                assert!(!msg.is_empty());
            } else {
                assert!(matches!(e, CudaError::NoDriver), "unexpected error: {msg}");
                assert!(
                    msg.contains("libcuda") && msg.contains("no CUDA driver"),
                    "message does not name the missing driver: {msg}"
                );
            }
        }
    }
}

#[test]
fn other_devices_fail_the_same_way() {
    if driver_available() {
        return;
    }
    for ordinal in [0, 3] {
        match Cuda::with_device(ordinal) {
            Err(CudaError::NoDriver) => {}
            other => panic!("device {ordinal}: expected NoDriver, got {other:?}"),
        }
    }
}
