//! Moving arrays between NumPy and the CPU backend.

use flux_kernels::{Cpu, DType, HostData, SamplerOps, Tensor};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Host values of one float array.
pub enum HostVec {
    /// float32 values.
    F32(Vec<f32>),
    /// float64 values.
    F64(Vec<f64>),
}

impl HostVec {
    /// The values as backend host data.
    pub fn as_host(&self) -> HostData<'_> {
        match self {
            HostVec::F32(v) => HostData::F32(v),
            HostVec::F64(v) => HostData::F64(v),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostVec::F32(_) => DType::F32,
            HostVec::F64(_) => DType::F64,
        }
    }
}

/// A float array read from Python: its shape and values in C order.
pub struct HostArray {
    /// The shape.
    pub shape: Vec<usize>,
    /// The values.
    pub data: HostVec,
}

/// `numpy.asarray(obj)`: works for arrays, nested lists and anything with the array protocol
/// (torch CPU tensors among them).
pub fn as_numpy<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyAny>> {
    let np = obj.py().import("numpy")?;
    np.call_method1("asarray", (obj,)).map_err(|e| {
        PyValueError::new_err(format!(
            "{what}: cannot be converted to a numpy array ({e})"
        ))
    })
}

/// Name of a NumPy dtype (`float32`, `int64`, ...) for error messages.
fn dtype_name(arr: &Bound<'_, PyAny>) -> String {
    arr.getattr("dtype")
        .and_then(|d| d.str())
        .map_or_else(|_| "unknown".to_string(), |s| s.to_string())
}

/// The values of an array in C order: one copy when contiguous, else element by element.
fn c_order_values<T: numpy::Element + Copy>(ro: &numpy::PyReadonlyArrayDyn<'_, T>) -> Vec<T> {
    // `as_slice` also accepts Fortran order, whose memory order is not C order.
    match ro.as_slice() {
        Ok(s) if ro.is_c_contiguous() => s.to_vec(),
        _ => ro.as_array().iter().copied().collect(),
    }
}

/// Reads a float32 or float64 array (any layout) as C-order host values.
pub fn read_float_array(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<HostArray> {
    let arr = as_numpy(obj, what)?;
    if let Ok(a) = arr.cast::<PyArrayDyn<f32>>() {
        let ro = a
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
        return Ok(HostArray {
            shape: ro.shape().to_vec(),
            data: HostVec::F32(c_order_values(&ro)),
        });
    }
    if let Ok(a) = arr.cast::<PyArrayDyn<f64>>() {
        let ro = a
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
        return Ok(HostArray {
            shape: ro.shape().to_vec(),
            data: HostVec::F64(c_order_values(&ro)),
        });
    }
    Err(PyValueError::new_err(format!(
        "{what}: expected a float32 or float64 array, got dtype {}",
        dtype_name(&arr)
    )))
}

/// Reads a one-dimensional array of numbers as float64 (`numpy.asarray(obj, dtype=float64)`).
pub fn read_f64_vector(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<f64>> {
    let np = obj.py().import("numpy")?;
    let arr = np.call_method1("asarray", (obj, "float64")).map_err(|e| {
        PyValueError::new_err(format!(
            "{what}: expected a one-dimensional sequence of numbers ({e})"
        ))
    })?;
    let a = arr.cast::<PyArrayDyn<f64>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: expected a one-dimensional array of numbers"
        ))
    })?;
    if a.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{what}: expected a one-dimensional array, got shape {:?}",
            a.shape()
        )));
    }
    let ro = a
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    Ok(c_order_values(&ro))
}

/// A new NumPy array holding `data` with `shape`.
pub fn to_numpy<'py>(
    py: Python<'py>,
    data: HostVec,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let shape = shape.to_vec();
    Ok(match data {
        HostVec::F32(v) => PyArray1::from_vec(py, v).reshape(shape)?.into_any(),
        HostVec::F64(v) => PyArray1::from_vec(py, v).reshape(shape)?.into_any(),
    })
}

/// Downloads a backend tensor into host values of its own float type.
pub fn download(be: Cpu, t: &Tensor<Cpu>) -> PyResult<HostVec> {
    let r = match t.dtype() {
        DType::F32 => be.download_f32(t).map(HostVec::F32),
        _ => be.download_f64(t).map(HostVec::F64),
    };
    r.map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A backend tensor as a new NumPy array.
pub fn tensor_to_numpy<'py>(
    py: Python<'py>,
    be: Cpu,
    t: &Tensor<Cpu>,
) -> PyResult<Bound<'py, PyAny>> {
    to_numpy(py, download(be, t)?, t.shape())
}

/// Reads what a Python callable returned as a tensor of exactly `shape`, converted to `dtype`.
pub fn array_to_tensor(
    be: Cpu,
    obj: &Bound<'_, PyAny>,
    shape: &[usize],
    dtype: DType,
    what: &str,
) -> PyResult<Tensor<Cpu>> {
    let arr = read_float_array(obj, what)?;
    if arr.shape != shape {
        return Err(PyValueError::new_err(format!(
            "{what}: expected shape {shape:?}, got {:?}",
            arr.shape
        )));
    }
    be.upload(arr.data.as_host(), shape, dtype)
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}
