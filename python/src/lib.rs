//! `linattn._linattn`, the extension module under the Python package in `linattn/`: the
//! library's calls on NumPy arrays, forward and backward, for the gated family and for
//! any method of the catalogue by name. The package's functions carry
//! flash-linear-attention's names and arguments and reshape its layouts into the
//! library's; this module takes the library's layouts (`[B, T, H, D]`, g `[B, T, HV, 1 or
//! d_k]`, β `[B, T, HV, 1]`) and raises [`LinattnError`] with the library's message for
//! whatever it refuses.

use linattn::{
    Attention, DeltaRule, Element, GateInputs, GatedDeltaRule, Gla, Method, MethodOptions,
    Retention, Tensor,
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

/// What one call of the gated family takes besides its tensors.
struct GatedCall {
    attention: Attention,
    cu_seqlens: Option<Vec<usize>>,
}

impl GatedCall {
    fn new(
        method: &str,
        scale: Option<f64>,
        l2norm_qk: bool,
        cu_seqlens: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        let method = gated_method(method, scale, l2norm_qk)?;
        Ok(Self {
            attention: Attention::new(method).causal(true),
            cu_seqlens,
        })
    }
}

/// A call's arrays as tensors of q's element type: q, k, v, then the optional g, β and
/// initial state.
struct Tensors<T> {
    qkv: [Tensor<T>; 3],
    g: Option<Tensor<T>>,
    beta: Option<Tensor<T>>,
    initial_state: Option<Tensor<T>>,
}

type Arrays<'a, 'py> = [Option<&'a Bound<'py, PyAny>>; 3];

impl<T: Element + numpy::Element> Tensors<T> {
    fn read<'py>(
        [q, k, v]: [&Bound<'py, PyAny>; 3],
        [g, beta, initial_state]: Arrays<'_, 'py>,
    ) -> PyResult<Self> {
        Ok(Self {
            qkv: [read("q", q)?, read("k", k)?, read("v", v)?],
            g: optional("g", g)?,
            beta: optional("beta", beta)?,
            initial_state: optional("initial_state", initial_state)?,
        })
    }

    fn inputs<'a>(&'a self, call: &'a GatedCall) -> GateInputs<'a, T> {
        GateInputs {
            g: self.g.as_ref(),
            beta: self.beta.as_ref(),
            initial_state: self.initial_state.as_ref(),
            cu_seqlens: call.cu_seqlens.as_deref(),
            ..GateInputs::default()
        }
    }
}

/// Array `name` as a tensor of `T`, or a TypeError naming what it should have been.
fn read<'py, T: Element + numpy::Element>(
    name: &str,
    x: &Bound<'py, PyAny>,
) -> PyResult<Tensor<T>> {
    let array = x.extract::<PyReadonlyArrayDyn<'py, T>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a NumPy array of {} like q",
            T::NAME
        ))
    })?;
    tensor(name, &array)
}

fn optional<T: Element + numpy::Element>(
    name: &str,
    x: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Tensor<T>>> {
    x.map(|x| read(name, x)).transpose()
}

fn object<T: Element + numpy::Element>(py: Python<'_>, tensor: Tensor<T>) -> PyResult<Py<PyAny>> {
    Ok(array(py, tensor)?.into_any().unbind())
}

/// The output and the final states of `call` on arrays of one element type `T`.
fn forward_as<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    call: GatedCall,
    tensors: [&Bound<'py, PyAny>; 3],
    gates: Arrays<'_, 'py>,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let x = Tensors::<T>::read(tensors, gates)?;
    let [q, k, v] = &x.qkv;
    let result = py.detach(|| call.attention.forward_gated(q, k, v, &x.inputs(&call)));
    let result = result.map_err(refused)?;
    Ok((object(py, result.out)?, object(py, result.final_state)?))
}

/// The gradients of `call` for the output's gradient `d_out` (and the final state's):
/// dq, dk, dv, dg (None where g was not given), dβ (likewise), d(initial state).
type Gradients = (
    Py<PyAny>,
    Py<PyAny>,
    Py<PyAny>,
    Option<Py<PyAny>>,
    Option<Py<PyAny>>,
    Py<PyAny>,
);

fn backward_as<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    call: GatedCall,
    tensors: [&Bound<'py, PyAny>; 3],
    gates: Arrays<'_, 'py>,
    (d_out, d_final_state): (&Bound<'py, PyAny>, Option<&Bound<'py, PyAny>>),
) -> PyResult<Gradients> {
    let x = Tensors::<T>::read(tensors, gates)?;
    let d_out: Tensor<T> = read("d_out", d_out)?;
    let d_final_state = optional("d_final_state", d_final_state)?;
    let [q, k, v] = &x.qkv;
    let grads = py.detach(|| {
        let inputs = x.inputs(&call);
        call.attention
            .backward_gated(q, k, v, &inputs, &d_out, d_final_state.as_ref())
    });
    let grads = grads.map_err(refused)?;
    let maybe = |x: Option<Tensor<T>>| x.map(|x| object(py, x)).transpose();
    Ok((
        object(py, grads.dq)?,
        object(py, grads.dk)?,
        object(py, grads.dv)?,
        maybe(grads.dg)?,
        maybe(grads.dbeta)?,
        object(py, grads.d_initial_state)?,
    ))
}

/// Calls `$run::<T>(py, call, …)` for q's element type, float32 or float64.
macro_rules! by_element {
    ($q:expr, $run:ident ( $($argument:expr),* )) => {
        if $q.cast::<PyArrayDyn<f32>>().is_ok() {
            $run::<f32>($($argument),*)
        } else if $q.cast::<PyArrayDyn<f64>>().is_ok() {
            $run::<f64>($($argument),*)
        } else {
            Err(PyTypeError::new_err(
                "q must be a NumPy array of float32 or float64 (on the CPU)",
            ))
        }
    };
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
    let call = GatedCall::new(method, scale, l2norm_qk, cu_seqlens)?;
    by_element!(q, forward_as(py, call, [q, k, v], [g, beta, initial_state]))
}

/// The gradients of [`gated_forward`]'s call for the gradient `d_out` of its output and
/// `d_final_state` of its final states: (dq, dk, dv, dg, dbeta, d_initial_state), dg and
/// dbeta None where g and beta were not given.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, d_out, g=None, beta=None, initial_state=None, d_final_state=None, cu_seqlens=None, scale=None, l2norm_qk=false))]
#[allow(clippy::too_many_arguments)] // the Python signature: keyword arguments, each optional
fn gated_backward<'py>(
    py: Python<'py>,
    method: &str,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    d_out: &Bound<'py, PyAny>,
    g: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    initial_state: Option<&Bound<'py, PyAny>>,
    d_final_state: Option<&Bound<'py, PyAny>>,
    cu_seqlens: Option<Vec<usize>>,
    scale: Option<f64>,
    l2norm_qk: bool,
) -> PyResult<Gradients> {
    let call = GatedCall::new(method, scale, l2norm_qk, cu_seqlens)?;
    let gates = [g, beta, initial_state];
    by_element!(
        q,
        backward_as(py, call, [q, k, v], gates, (d_out, d_final_state))
    )
}

/// `method` of the catalogue with `options` (by the names `linattn --method` takes),
/// causal or not, for q of `head_dim` and keys of `key_len`.
fn attention(
    method: &str,
    causal: bool,
    options: &[(String, String)],
    [head_dim, key_len]: [usize; 2],
) -> PyResult<Attention> {
    let mut given = MethodOptions::new(head_dim, key_len);
    for (name, value) in options {
        given.set(name, value);
    }
    let method = Method::from_options(method, &given).map_err(refused)?;
    Ok(Attention::new(method).causal(causal))
}

/// The method of a call by name, and its q, k and v as tensors of `T`.
type NamedCall<'a> = (&'a str, bool, &'a [(String, String)]);

fn named_call<'py, T: Element + numpy::Element>(
    (method, causal, options): NamedCall<'_>,
    [q, k, v]: [&Bound<'py, PyAny>; 3],
) -> PyResult<(Attention, [Tensor<T>; 3])> {
    let [q, k, v] = [read::<T>("q", q)?, read("k", k)?, read("v", v)?];
    let attention = attention(method, causal, options, [q.head_dim(), k.seq_len()])?;
    Ok((attention, [q, k, v]))
}

fn forward_any<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    call: NamedCall<'_>,
    tensors: [&Bound<'py, PyAny>; 3],
) -> PyResult<Py<PyAny>> {
    let (attention, [q, k, v]) = named_call::<T>(call, tensors)?;
    let out = py
        .detach(|| attention.forward(&q, &k, &v))
        .map_err(refused)?;
    object(py, out)
}

fn backward_any<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    call: NamedCall<'_>,
    [q, k, v, d_out]: [&Bound<'py, PyAny>; 4],
) -> PyResult<(Py<PyAny>, Py<PyAny>, Py<PyAny>)> {
    let (attention, [q, k, v]) = named_call::<T>(call, [q, k, v])?;
    let d_out = read::<T>("d_out", d_out)?;
    let grads = py
        .detach(|| attention.backward(&q, &k, &v, &d_out))
        .map_err(refused)?;
    Ok((
        object(py, grads.dq)?,
        object(py, grads.dk)?,
        object(py, grads.dv)?,
    ))
}

/// Any method of the catalogue on float32 or float64 arrays `[B, T, H, D]`: `options` are
/// (name, value) pairs as `linattn --method NAME --OPTION VALUE` takes them.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, causal=false, options=Vec::new()))]
fn attention_forward<'py>(
    py: Python<'py>,
    method: &str,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    causal: bool,
    options: Vec<(String, String)>,
) -> PyResult<Py<PyAny>> {
    by_element!(q, forward_any(py, (method, causal, &options), [q, k, v]))
}

/// The gradients (dq, dk, dv) of [`attention_forward`]'s call for the output's gradient
/// `d_out`.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, d_out, causal=false, options=Vec::new()))]
#[allow(clippy::too_many_arguments)] // the Python signature: keyword arguments, each optional
fn attention_backward<'py>(
    py: Python<'py>,
    method: &str,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    d_out: &Bound<'py, PyAny>,
    causal: bool,
    options: Vec<(String, String)>,
) -> PyResult<(Py<PyAny>, Py<PyAny>, Py<PyAny>)> {
    by_element!(
        q,
        backward_any(py, (method, causal, &options), [q, k, v, d_out])
    )
}

#[pymodule]
fn _linattn(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(gated_forward, module)?)?;
    module.add_function(wrap_pyfunction!(gated_backward, module)?)?;
    module.add_function(wrap_pyfunction!(attention_forward, module)?)?;
    module.add_function(wrap_pyfunction!(attention_backward, module)?)?;
    module.add("LinattnError", module.py().get_type::<LinattnError>())?;
    Ok(())
}
