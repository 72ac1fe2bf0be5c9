//! `linattn._linattn`, the extension module under the Python package in `linattn/`: the
//! library's calls on NumPy arrays. The package's functions carry flash-linear-attention's
//! names and arguments and reshape its layouts into the library's; this module takes the
//! library's layouts (`[B, T, H, D]`, g `[B, T, HV, 1 or d_k]`, β `[B, T, HV, 1]`) and
//! raises [`LinattnError`] with the library's message for whatever it refuses.

use linattn::{
    Attention, DeltaRule, Element, GateInputs, GatedDeltaRule, Gla, Method, Retention, Tensor,
};
use numpy::{PyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    _linattn,
    LinattnError,
    PyValueError,
    "A call linattn refuses (shapes, options, inputs out of range), with the library's message."
);

fn refused(error: linattn::Error) -> PyErr {
    LinattnError::new_err(error.to_string())
}

/// The gated family's methods by their catalogue names, with the options the package's
/// functions set.
fn gated_method(name: &str, scale: Option<f64>, l2norm_qk: bool) -> PyResult<Method> {
    Ok(match name {
        "retention" => Method::Retention(Retention {
            scale,
            ..Retention::default()
        }),
        "gla" => Method::Gla(Gla {
            scale,
            ..Gla::default()
        }),
        "delta-rule" => Method::DeltaRule(DeltaRule {
            l2norm_qk,
            scale,
            ..DeltaRule::default()
        }),
        "gated-delta-rule" => Method::GatedDeltaRule(GatedDeltaRule {
            l2norm_qk,
            scale,
            ..GatedDeltaRule::default()
        }),
        other => {
            return Err(LinattnError::new_err(format!(
                "{other} is not of the gated family (retention, gla, delta-rule, gated-delta-rule)"
            )));
        }
    })
}

/// A 4-D array as a tensor: its elements in C order, whatever its strides.
fn tensor<T: Element + numpy::Element>(
    name: &str,
    array: &PyReadonlyArrayDyn<'_, T>,
) -> PyResult<Tensor<T>> {
    let shape: [usize; 4] = array.shape().try_into().map_err(|_| {
        LinattnError::new_err(format!(
            "{name} has {} dimensions; linattn takes [batch, seq, heads, dim]",
            array.ndim()
        ))
    })?;
    let values = array.as_array().iter().copied().collect();
    Tensor::from_vec(values, shape).map_err(refused)
}

fn array<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    tensor: Tensor<T>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let shape = tensor.shape();
    PyArray::from_vec(py, tensor.into_vec()).reshape(shape.to_vec())
}

/// What one call of the gated family takes besides q, k and v.
struct GatedCall {
    method: Method,
    cu_seqlens: Option<Vec<usize>>,
}

/// The output and the final states of `call` on arrays of one element type `T`.
fn gated_as<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    call: GatedCall,
    [q, k, v]: [&Bound<'py, PyAny>; 3],
    [g, beta, initial_state]: [Option<&Bound<'py, PyAny>>; 3],
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let read = |name: &str, x: &Bound<'py, PyAny>| -> PyResult<Tensor<T>> {
        let array = x.extract::<PyReadonlyArrayDyn<'py, T>>().map_err(|_| {
            PyTypeError::new_err(format!(
                "{name} must be a NumPy array of {} like q",
                std::any::type_name::<T>()
            ))
        })?;
        tensor(name, &array)
    };
    let optional = |name: &str, x: Option<&Bound<'py, PyAny>>| x.map(|x| read(name, x)).transpose();
    let (q, k, v) = (read("q", q)?, read("k", k)?, read("v", v)?);
    let g = optional("g", g)?;
    let beta = optional("beta", beta)?;
    let initial_state = optional("initial_state", initial_state)?;
    let attention = Attention::new(call.method).causal(true);
    let result = py.detach(|| {
        let inputs = GateInputs {
            g: g.as_ref(),
            beta: beta.as_ref(),
            initial_state: initial_state.as_ref(),
            cu_seqlens: call.cu_seqlens.as_deref(),
            ..GateInputs::default()
        };
        attention.forward_gated(&q, &k, &v, &inputs)
    });
    let result = result.map_err(refused)?;
    let out = array(py, result.out)?.into_any().unbind();
    Ok((out, array(py, result.final_state)?.into_any().unbind()))
}

/// `method` (`retention`, `gla`, `delta-rule`, `gated-delta-rule`) on float32 or float64
/// arrays in the library's layout; returns the output and the final states.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, g=None, beta=None, initial_state=None, cu_seqlens=None, scale=None, l2norm_qk=false))]
#[allow(clippy::too_many_arguments)] // the Python signature: keyword arguments, each optional
fn gated_forward<'py>(
    py: Python<'py>,
    method: &str,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    g: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    initial_state: Option<&Bound<'py, PyAny>>,
    cu_seqlens: Option<Vec<usize>>,
    scale: Option<f64>,
    l2norm_qk: bool,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let call = GatedCall {
        method: gated_method(method, scale, l2norm_qk)?,
        cu_seqlens,
    };
    let tensors = [q, k, v];
    let gates = [g, beta, initial_state];
    if q.cast::<PyArrayDyn<f32>>().is_ok() {
        gated_as::<f32>(py, call, tensors, gates)
    } else if q.cast::<PyArrayDyn<f64>>().is_ok() {
        gated_as::<f64>(py, call, tensors, gates)
    } else {
        Err(PyTypeError::new_err(
            "q must be a NumPy array of float32 or float64 (on the CPU)",
        ))
    }
}

#[pymodule]
fn _linattn(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(gated_forward, module)?)?;
    module.add("LinattnError", module.py().get_type::<LinattnError>())?;
    Ok(())
}
