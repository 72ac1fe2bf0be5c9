//! Why this file is long: it is the binary's one end-to-end suite, every subcommand's
//! outputs and every kind of bad input sharing the helpers that write .npy files and
//! run the binary; split by subcommand it would repeat them.
//!
//! The `linattn` binary end to end: `run` outputs against the library's f64 reference
//! definitions and its gradients against the library's backward pass, one clear message
//! and exit status 2 for every kind of bad input, the records of `bench`, and the
//! state memory `decode` reports.

use linattn::{
    Attention, Cosformer, Element, Fnet, GlobalHeads, Hybrid, Linear, Linformer, Method, Performer,
    Softmax, SoftmaxAlgorithm, Tensor, Window, reference,
};
mod common;

use common::{Scratch, linattn};
use std::ffi::OsStr;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Reads an array the binary wrote; panics unless its element type is `T`.
fn read_npy<T: npyz::Deserialize>(path: &Path) -> (Vec<usize>, Vec<T>) {
    let file = npyz::NpyFile::new(BufReader::new(File::open(path).unwrap())).unwrap();
    let shape = file.shape().iter().map(|&d| d as usize).collect();
    (shape, file.into_vec().unwrap())
}

/// A .npy file of format 1.0 with `header` as its dict and `data` after it, padded as
/// NumPy pads.
fn npy_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string();
    while !(10 + text.len() + 1).is_multiple_of(64) {
        text.push(' ');
    }
    text.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((text.len() as u16).to_le_bytes());
    bytes.extend(text.as_bytes());
    bytes.extend(data);
    bytes
}

fn header(descr: &str, fortran_order: bool, shape: &str) -> String {
    let order = if fortran_order { "True" } else { "False" };
    format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}")
}

/// q `[batch, len_q, heads_q, dim]`, k `[batch, len_k, heads_kv, dim]`,
/// v `[batch, len_k, heads_kv, dim_v]`.
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    len_q: usize,
    len_k: usize,
    heads_q: usize,
    heads_kv: usize,
    dim: usize,
    dim_v: usize,
}

/// Odd lengths that no chunk or tile divides, GQA, and d_v ≠ d.
const GQA: Shape = Shape {
    batch: 2,
    len_q: 37,
    len_k: 37,
    heads_q: 4,
    heads_kv: 2,
    dim: 12,
    dim_v: 5,
};

/// Fewer queries than keys (cross attention), MQA.
const CROSS: Shape = Shape {
    batch: 1,
    len_q: 11,
    len_k: 23,
    heads_q: 3,
    heads_kv: 1,
    dim: 7,
    dim_v: 9,
};

impl Shape {
    fn inputs<T: Element>(&self, seed: u64) -> [Tensor<T>; 3] {
        let Shape {
            batch,
            len_q,
            len_k,
            heads_q,
            heads_kv,
            dim,
            dim_v,
        } = *self;
        [
            Tensor::randn([batch, len_q, heads_q, dim], seed).unwrap(),
            Tensor::randn([batch, len_k, heads_kv, dim], seed + 1).unwrap(),
            Tensor::randn([batch, len_k, heads_kv, dim_v], seed + 2).unwrap(),
        ]
    }
}

/// The command-line words in `list`, owned.
fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|w| w.to_string()).collect()
}

fn path_arg(path: PathBuf) -> String {
    path.into_os_string().into_string().unwrap()
}

/// Writes inputs of `shape`, runs `linattn run` with the method arguments that
/// `method_args` returns (it may write files such as ω first), and checks the output
/// against the f64 reference of `method` on the same f32 inputs.
fn check_against_reference(
    test: &str,
    shape: Shape,
    causal: bool,
    method: Method,
    method_args: impl FnOnce(&Scratch) -> Vec<String>,
) {
    let scratch = Scratch::new(test);
    let [q, k, v] = shape.inputs::<f32>(11);
    let out = scratch.path("out.npy");
    let mut args = words(&["run"]);
    args.extend(method_args(&scratch));
    for (flag, name, tensor) in [
        ("--q", "q.npy", &q),
        ("--k", "k.npy", &k),
        ("--v", "v.npy", &v),
    ] {
        args.extend([flag.to_string(), path_arg(scratch.tensor(name, tensor))]);
    }
    args.extend(["--out".to_string(), path_arg(out.clone())]);
    if causal {
        args.push("--causal".into());
    }
    let output = linattn(&args);
    assert!(
        output.status.success(),
        "{test}: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let (out_shape, got) = read_npy::<f32>(&out);
    let attention = Attention::new(method).causal(causal);
    let expected = reference::forward(&attention, &q.cast(), &k.cast(), &v.cast()).unwrap();
    assert_eq!(out_shape, expected.shape(), "{test}");
    let scale = expected
        .as_slice()
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs()));
    let error = got
        .iter()
        .zip(expected.as_slice())
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
    assert!(
        error <= 1e-5 * scale,
        "{test}: error {error:e} at scale {scale}"
    );
}

#[test]
fn linear_matches_reference() {
    check_against_reference(
        "linear-causal",
        GQA,
        true,
        Method::Linear(Linear { chunk: 8 }),
        |_| words(&["--method", "linear", "--chunk", "8"]),
    );
    check_against_reference("linear-cross", CROSS, false, Method::linear(), |_| {
        words(&["--method", "linear"])
    });
}

#[test]
fn performer_matches_reference_with_given_and_drawn_features() {
    let omega = linattn::orthogonal_random_features(16, GQA.dim, 5);
    check_against_reference(
        "performer-omega",
        GQA,
        true,
        Method::Performer(Performer {
            chunk: 6,
            ..Performer::with_omega(omega.clone(), 16)
        }),
        |scratch| {
            let omega = scratch.array("omega.npy", &[16, GQA.dim], &omega);
            let mut args = words(&["--method", "performer", "--chunk", "6", "--omega"]);
            args.push(path_arg(omega));
            args
        },
    );
    check_against_reference(
        "performer-drawn",
        CROSS,
        false,
        Method::Performer(Performer::new(24, 7)),
        |_| words(&["--method", "performer", "--features", "24", "--seed", "7"]),
    );
}

#[test]
fn cosformer_matches_reference() {
    check_against_reference(
        "cosformer",
        GQA,
        true,
        Method::Cosformer(Cosformer {
            chunk: 5,
            ..Cosformer::default()
        }),
        |_| words(&["--method", "cosformer", "--chunk", "5"]),
    );
    // A fixed M longer than the sequence, as decoding uses.
    check_against_reference(
        "cosformer-max-len",
        GQA,
        true,
        Method::Cosformer(Cosformer {
            chunk: 5,
            max_len: Some(50),
        }),
        |_| words(&["--method", "cosformer", "--chunk", "5", "--max-len", "50"]),
    );
}

#[test]
fn linformer_matches_reference_with_given_projections() {
    // max_len beyond the key length: only the first rows of E and F apply.
    let (max_len, k) = (40, 6);
    let (e, f) = linattn::linformer_projections(max_len, k, 3);
    check_against_reference(
        "linformer",
        GQA,
        false,
        Method::Linformer(Linformer::with_projections(
            e.clone(),
            f.clone(),
            max_len,
            k,
        )),
        |scratch| {
            let e = scratch.array("e.npy", &[max_len, k], &e);
            let f = scratch.array("f.npy", &[max_len, k], &f);
            let mut args = words(&["--method", "linformer", "--proj-k"]);
            args.extend([path_arg(e), "--proj-v".into(), path_arg(f)]);
            args
        },
    );
}

#[test]
fn softmax_and_window_match_reference() {
    check_against_reference(
        "softmax-naive",
        GQA,
        true,
        Method::Softmax(Softmax {
            scale: Some(0.3),
            algorithm: SoftmaxAlgorithm::Naive,
        }),
        |_| {
            words(&[
                "--method",
                "softmax",
                "--scale",
                "0.3",
                "--algorithm",
                "naive",
            ])
        },
    );
    check_against_reference("softmax-cross", CROSS, false, Method::softmax(), |_| {
        words(&["--method", "softmax"])
    });
    check_against_reference(
        "window-left",
        GQA,
        false,
        Method::Window(Window::new(Some(3), None)),
        |_| words(&["--method", "window", "--window", "3,-1"]),
    );
    check_against_reference(
        "window-causal",
        GQA,
        true,
        Method::Window(Window::new(None, Some(2))),
        |_| words(&["--method", "window", "--window", "-1,2"]),
    );
}

#[test]
fn fnet_matches_reference() {
    check_against_reference("fnet", GQA, false, Method::Fnet(Fnet), |_| {
        words(&["--method", "fnet"])
    });
}

#[test]
fn hybrid_matches_reference_with_linear_and_performer_heads() {
    check_against_reference(
        "hybrid-linear",
        GQA,
        true,
        Method::Hybrid(Hybrid {
            local_heads: 1,
            window: Window::new(Some(4), Some(1)),
            global: GlobalHeads::Linear(Linear::default()),
        }),
        |_| {
            words(&[
                "--method",
                "hybrid",
                "--window",
                "4,1",
                "--local-heads",
                "1",
            ])
        },
    );
    check_against_reference(
        "hybrid-performer",
        GQA,
        false,
        Method::Hybrid(Hybrid {
            local_heads: 2,
            window: Window::new(Some(2), Some(2)),
            global: GlobalHeads::Performer(Performer::new(8, 3)),
        }),
        |_| {
            words(&[
                "--method",
                "hybrid",
                "--window",
                "2,2",
                "--local-heads",
                "2",
                "--global",
                "performer",
                "--features",
                "8",
                "--seed",
                "3",
            ])
        },
    );
}

#[test]
fn float64_inputs_give_float64_output() {
    let scratch = Scratch::new("float64");
    let [q, k, v] = GQA.inputs::<f64>(3);
    let out = scratch.path("out.npy");
    let output = linattn([
        "run".as_ref(),
        "--method".as_ref(),
        "linear".as_ref(),
        "--causal".as_ref(),
        "--q".as_ref(),
        scratch.tensor("q.npy", &q).as_os_str(),
        "--k".as_ref(),
        scratch.tensor("k.npy", &k).as_os_str(),
        "--v".as_ref(),
        scratch.tensor("v.npy", &v).as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ] as [&OsStr; 12]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, got) = read_npy::<f64>(&out);
    let attention = Attention::new(Method::linear()).causal(true);
    let expected = reference::forward(&attention, &q, &k, &v).unwrap();
    for (a, b) in got.iter().zip(expected.as_slice()) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}

/// Values equal to `expected` up to rounding (the same f64 code, possibly summed in
/// another order).
fn assert_close(got: &[f64], expected: &[f64], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}");
    let scale = expected.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (a, b) in got.iter().zip(expected) {
        assert!((a - b).abs() <= 1e-12 * scale, "{what}: {a} vs {b}");
    }
}

/// Runs `run --grad-out` on f64 inputs of `shape` and checks the output and dq, dk, dv
/// (and Linformer's dE, dF) against the library's backward pass.
fn check_gradients(test: &str, shape: Shape, causal: bool, method: Method, method_args: &[&str]) {
    let scratch = Scratch::new(test);
    let [q, k, v] = shape.inputs::<f64>(21);
    let attention = Attention::new(method).causal(causal);
    let out_shape = attention
        .output_shape(q.shape(), k.shape(), v.shape())
        .unwrap();
    let d_out = Tensor::<f64>::randn(out_shape, 24).unwrap();
    let mut args = words(&["run"]);
    args.extend(words(method_args));
    for (flag, name, tensor) in [
        ("--q", "q.npy", &q),
        ("--k", "k.npy", &k),
        ("--v", "v.npy", &v),
        ("--grad-out", "do.npy", &d_out),
    ] {
        args.extend([flag.to_string(), path_arg(scratch.tensor(name, tensor))]);
    }
    args.extend(["--out".into(), path_arg(scratch.path("out.npy"))]);
    args.extend(["--grads-prefix".into(), path_arg(scratch.path("grad_"))]);
    if causal {
        args.push("--causal".into());
    }
    let output = linattn(&args);
    assert!(
        output.status.success(),
        "{test}: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let (_, out) = read_npy::<f64>(&scratch.path("out.npy"));
    let forward = attention.forward(&q, &k, &v).unwrap();
    assert_close(&out, forward.as_slice(), &format!("{test} output"));
    let expected = attention.backward(&q, &k, &v, &d_out).unwrap();
    for (name, gradient) in [
        ("dq", &expected.dq),
        ("dk", &expected.dk),
        ("dv", &expected.dv),
    ] {
        let (got_shape, got) = read_npy::<f64>(&scratch.path(&format!("grad_{name}.npy")));
        assert_eq!(got_shape, gradient.shape(), "{test} {name}");
        assert_close(&got, gradient.as_slice(), &format!("{test} {name}"));
    }
    let projection_files = ["dE", "dF"].map(|name| scratch.path(&format!("grad_{name}.npy")));
    match (&expected.projections, attention.method()) {
        (Some((d_e, d_f)), Method::Linformer(linformer)) => {
            for (path, gradient) in projection_files.iter().zip([d_e, d_f]) {
                let (got_shape, got) = read_npy::<f64>(path);
                assert_eq!(got_shape, [linformer.max_len, linformer.k], "{test}");
                assert_close(&got, gradient, &format!("{test} {}", path.display()));
            }
        }
        _ => assert!(
            projection_files.iter().all(|path| !path.exists()),
            "{test}: projection gradients written for a method without projections"
        ),
    }
}

#[test]
fn run_gradients_match_the_library_backward() {
    check_gradients(
        "grad-linear",
        GQA,
        true,
        Method::Linear(Linear { chunk: 8 }),
        &["--method", "linear", "--chunk", "8"],
    );
    check_gradients(
        "grad-softmax",
        CROSS,
        false,
        Method::softmax(),
        &["--method", "softmax"],
    );
    // Projections longer than the sequence: their last rows get zero gradient.
    check_gradients(
        "grad-linformer",
        GQA,
        false,
        Method::Linformer(Linformer::new(40, 6, 3)),
        &[
            "--method",
            "linformer",
            "--k-proj",
            "6",
            "--max-len",
            "40",
            "--seed",
            "3",
        ],
    );
}

/// Runs `run` with `method_args` on q, k, v at the given paths and checks that it fails
/// with exit status 2, one line naming the problem (`expected`), and no panic.
fn assert_rejected(q: &Path, k: &Path, v: &Path, method_args: &[&str], expected: &str) {
    let out = q.with_file_name("out.npy");
    let mut args: Vec<&OsStr> = vec!["run".as_ref()];
    args.extend(method_args.iter().map(OsStr::new));
    for (flag, path) in [("--q", q), ("--k", k), ("--v", v), ("--out", &out)] {
        args.extend([OsStr::new(flag), path.as_os_str()]);
    }
    let output = linattn(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{expected}: {stderr}");
    assert!(
        stderr.contains(expected),
        "wanted {expected:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!out.exists(), "{expected}: an output was written");
}

/// Small valid f32 inputs of [`GQA`]'s shape, as files.
fn valid_inputs(scratch: &Scratch) -> [PathBuf; 3] {
    let [q, k, v] = GQA.inputs::<f32>(0);
    [
        scratch.tensor("q.npy", &q),
        scratch.tensor("k.npy", &k),
        scratch.tensor("v.npy", &v),
    ]
}

#[test]
fn unreadable_or_malformed_files_are_named() {
    let scratch = Scratch::new("malformed");
    let [q, k, v] = valid_inputs(&scratch);
    let linear = ["--method", "linear"];
    let four_f32 = [0u8; 16];
    let cases: Vec<(PathBuf, &str)> = vec![
        (scratch.path("missing.npy"), "cannot read"),
        (
            scratch.bytes("text.npy", b"just some text, not an array"),
            "bad magic",
        ),
        (scratch.bytes("tiny.npy", b"\x93NU"), "too short"),
        (
            scratch.bytes("version.npy", b"\x93NUMPY\x09\x00\x10\x00"),
            "unsupported .npy format version 9.0",
        ),
        (
            scratch.bytes(
                "truncated.npy",
                &npy_bytes(&header("<f4", false, "(1, 4, 1, 2)"), &[0u8; 10]),
            ),
            "truncated",
        ),
        (
            scratch.bytes(
                "huge.npy",
                &npy_bytes(&header("<f4", false, "(1000000, 1000000, 1, 1)"), &four_f32),
            ),
            "needs 4000000000000 bytes of data but the file holds 16",
        ),
        (
            scratch.bytes(
                "overflow.npy",
                &npy_bytes(
                    &header("<f4", false, "(1099511627776, 1099511627776, 1, 1)"),
                    &four_f32,
                ),
            ),
            "more than 2^64",
        ),
        (
            scratch.bytes(
                "long-header.npy",
                &[&b"\x93NUMPY\x01\x00\x60\xea"[..], b"{'descr'"].concat(),
            ),
            "header claims 60000 bytes",
        ),
        (
            scratch.bytes(
                "bad-header.npy",
                &npy_bytes("{'descr': '<f4', 'shape': (1,", &[]),
            ),
            "bad header",
        ),
        (
            scratch.bytes(
                "trailing.npy",
                &npy_bytes(&header("<f4", false, "(1, 1, 1, 1)"), &four_f32),
            ),
            "12 bytes too many",
        ),
    ];
    for (bad, expected) in cases {
        assert_rejected(&bad, &k, &v, &linear, expected);
        assert_rejected(&q, &k, &bad, &linear, expected);
    }
}

#[test]
fn wrong_dtypes_layouts_and_ranks_are_named() {
    let scratch = Scratch::new("dtypes");
    let [q, k, v] = valid_inputs(&scratch);
    let linear = ["--method", "linear"];
    let int32 = scratch.bytes(
        "int32.npy",
        &npy_bytes(&header("<i4", false, "(1, 2, 1, 2)"), &[0u8; 16]),
    );
    assert_rejected(&int32, &k, &v, &linear, "unsupported dtype '<i4' (int32)");
    let float16 = scratch.bytes(
        "float16.npy",
        &npy_bytes(&header("<f2", false, "(1, 2, 1, 2)"), &[0u8; 8]),
    );
    assert_rejected(&q, &float16, &v, &linear, "(float16)");
    let three_d = scratch.array("three-d.npy", &[2, 37, 48], &vec![0.5f32; 2 * 37 * 48]);
    assert_rejected(&three_d, &k, &v, &linear, "3-D array");
    let [_, k64, _] = GQA.inputs::<f64>(0);
    let k64 = scratch.tensor("k64.npy", &k64);
    assert_rejected(
        &q,
        &k64,
        &v,
        &linear,
        "q, k and v must share a dtype, but q is float32, k is float64 and v is float32",
    );
}

#[test]
fn library_errors_are_printed() {
    let scratch = Scratch::new("library");
    let [q, k, v] = valid_inputs(&scratch);
    assert_rejected(
        &q,
        &k,
        &v,
        &["--method", "linformer", "--k-proj", "4", "--causal"],
        "linformer has no causal form",
    );
    let three_heads = scratch.tensor("q3.npy", &Tensor::<f32>::zeros([2, 37, 3, 12]).unwrap());
    assert_rejected(
        &three_heads,
        &k,
        &v,
        &["--method", "linear"],
        "head mismatch",
    );
    let mut nan = Tensor::<f32>::zeros([2, 37, 4, 12]).unwrap();
    nan.as_mut_slice()[5] = f32::NAN;
    let nan = scratch.tensor("nan.npy", &nan);
    assert_rejected(
        &nan,
        &k,
        &v,
        &["--method", "linear"],
        "q holds a non-finite value",
    );
    assert_rejected(
        &q,
        &k,
        &v,
        &[
            "--method",
            "softmax",
            "--algorithm",
            "naive",
            "--memory-limit",
            "1000",
        ],
        "but only 1000 B is available",
    );
}

#[test]
fn gradient_requests_are_checked() {
    let scratch = Scratch::new("grad-errors");
    let [q, k, v] = valid_inputs(&scratch);
    let prefix = path_arg(scratch.path("grad_"));
    // GQA's output is [2, 37, 4, 5]; this gradient has the wrong head_dim.
    let wrong_shape = path_arg(scratch.tensor(
        "do-shape.npy",
        &Tensor::<f32>::zeros([2, 37, 4, 6]).unwrap(),
    ));
    let float64 =
        path_arg(scratch.tensor("do-f64.npy", &Tensor::<f64>::zeros([2, 37, 4, 5]).unwrap()));
    for (args, expected) in [
        (
            &["--method", "linear", "--grad-out", &wrong_shape][..],
            "--grad-out needs --grads-prefix",
        ),
        (
            &["--method", "linear", "--grads-prefix", &prefix],
            "--grads-prefix needs --grad-out",
        ),
        (
            &[
                "--method",
                "linear",
                "--grad-out",
                &wrong_shape,
                "--grads-prefix",
                &prefix,
            ],
            "shape mismatch: the output gradient has shape [2, 37, 4, 6] but the output has shape [2, 37, 4, 5]",
        ),
        (
            &[
                "--method",
                "linear",
                "--grad-out",
                &float64,
                "--grads-prefix",
                &prefix,
            ],
            "is float64 but q, k and v are float32",
        ),
    ] {
        assert_rejected(&q, &k, &v, args, expected);
        assert!(!scratch.path("grad_dq.npy").exists(), "{expected}");
    }
}

#[test]
fn misused_options_are_named() {
    let scratch = Scratch::new("options");
    let [q, k, v] = valid_inputs(&scratch);
    for (args, expected) in [
        (
            &["--method", "softmax", "--chunk", "8"][..],
            "--chunk does not apply to softmax",
        ),
        (
            &["--method", "fnet", "--seed", "1"],
            "which takes no options",
        ),
        (
            &[
                "--method",
                "hybrid",
                "--window",
                "2,2",
                "--local-heads",
                "1",
                "--features",
                "8",
            ],
            "--features does not apply to hybrid with --global linear",
        ),
        (&["--method", "window"], "window needs --window L,R"),
        (
            &["--method", "hybrid", "--window", "2,2"],
            "hybrid needs --local-heads",
        ),
        (&["--method", "linformer"], "linformer needs --k-proj"),
    ] {
        assert_rejected(&q, &k, &v, args, expected);
    }
    let narrow = scratch.array("omega.npy", &[8, 5], &[1.0f64; 40]);
    let narrow = narrow.to_str().unwrap();
    assert_rejected(
        &q,
        &k,
        &v,
        &["--method", "performer", "--omega", narrow],
        "q's head_dim is 12",
    );
    let e = scratch.array("e.npy", &[40, 6], &[0.1f32; 240]);
    let f = scratch.array("f.npy", &[40, 5], &[0.1f32; 200]);
    assert_rejected(
        &q,
        &k,
        &v,
        &[
            "--method",
            "linformer",
            "--proj-k",
            e.to_str().unwrap(),
            "--proj-v",
            f.to_str().unwrap(),
        ],
        "they must match",
    );
}

/// Runs `bench` with `args` and parses the one JSON array it prints.
fn bench_json(args: &[&str]) -> Vec<serde_json::Value> {
    let output = linattn([&["bench", "--json"][..], args].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON array ({e}): {stdout}"))
}

#[test]
fn bench_reports_every_field_and_errors_against_exact_softmax() {
    let records = bench_json(&["--seq", "64,128", "--methods", "linear,softmax"]);
    assert_eq!(records.len(), 4);
    for record in &records {
        for field in [
            "method",
            "causal",
            "batch",
            "seq",
            "heads",
            "dim",
            "median_ms",
            "tokens_per_s",
            "extra_bytes",
            "rel_err",
            "floor_ms",
            "fraction_of_floor",
            "time_exponent",
            "copy_bytes_per_s",
            "matmul_flops_per_s",
            "skipped",
        ] {
            assert!(record.get(field).is_some(), "no {field} in {record}");
        }
        assert!(record["skipped"].is_null(), "{record}");
        let fraction = record["fraction_of_floor"].as_f64().unwrap();
        assert!(fraction > 0.0 && fraction < 1.0, "{record}");
        assert!(record["time_exponent"].as_f64().is_some(), "{record}");
        assert!(record["median_ms"].as_f64().unwrap() > 0.0, "{record}");
        assert!(record["tokens_per_s"].as_f64().unwrap() > 0.0, "{record}");
        let rel_err = record["rel_err"].as_f64().unwrap();
        match record["method"].as_str().unwrap() {
            "softmax" => assert!(rel_err < 1e-5, "{record}"),
            "linear" => assert!(rel_err > 0.0, "{record}"),
            other => panic!("unexpected method {other}"),
        }
    }
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [64, 64, 128, 128]);
}

#[test]
fn bench_skips_what_does_not_fit_or_does_not_apply() {
    // A limit between what linear attention and the naive score matrix need here, as the
    // library estimates it on this machine (its per-thread buffers differ by machine).
    let shape = [1, 2048, 8, 64];
    let needs = |method: Method| {
        let output = shape.iter().product::<usize>() as u128 * 4;
        output
            + Attention::new(method)
                .workspace_bytes(shape, shape, shape, 4)
                .unwrap()
    };
    let linear = needs(Method::linear());
    let naive = needs(Method::Softmax(Softmax {
        algorithm: SoftmaxAlgorithm::Naive,
        ..Softmax::default()
    }));
    assert!(linear < naive);
    let limit = ((linear + naive) / 2).to_string();
    let records = bench_json(&[
        "--seq",
        "2048",
        "--methods",
        "linear,softmax-naive",
        "--memory-limit",
        &limit,
    ]);
    assert_eq!(records.len(), 2);
    assert!(records[0]["skipped"].is_null(), "{}", records[0]);
    let reason = records[1]["skipped"].as_str().unwrap();
    assert!(
        reason.contains("needs") && reason.contains("available"),
        "{reason}"
    );
    assert!(records[1]["median_ms"].is_null() && records[1]["rel_err"].is_null());

    let output = linattn([
        "bench",
        "--seq",
        "32",
        "--methods",
        "linear,linformer",
        "--causal",
    ]);
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        table.starts_with("ceilings (measured now): memory copy "),
        "{table}"
    );
    let lines: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("method"))
        .collect();
    assert!(
        lines[0].starts_with("method") && lines[0].ends_with("of floor"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("linear") && !lines[2].contains("skipped"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("linformer") && lines[3].contains("skipped"),
        "{table}"
    );
    assert!(
        table.contains("skipped linformer at seq 32: linformer has no causal form"),
        "{table}"
    );
}

/// Runs `decode` on a small problem with `args` and returns its stdout.
fn decode(args: &[&str]) -> String {
    let small = [
        "--prompt-len",
        "16",
        "--tokens",
        "8",
        "--dim",
        "8",
        "--heads",
        "2",
    ];
    let output = linattn([&["decode"][..], &small, args].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn decode_shows_the_kv_cache_growing_and_linear_states_constant() {
    let stdout = decode(&["--json", "--method", "softmax,linear"]);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    let methods = report["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["softmax", "linear"]);
    for method in methods {
        assert!(method["skipped"].is_null(), "{method}");
        assert!(method["prefill_ms"].as_f64().unwrap() > 0.0, "{method}");
        let samples = method["samples"].as_array().unwrap();
        let contexts: Vec<u64> = samples
            .iter()
            .map(|s| s["context"].as_u64().unwrap())
            .collect();
        // Eight tokens: about ten rows means one per token.
        assert_eq!(contexts, (17..=24).collect::<Vec<u64>>(), "{method}");
        assert!(
            samples.iter().all(|s| s["step_us"].as_f64().unwrap() > 0.0),
            "{method}"
        );
        let bytes: Vec<u64> = samples
            .iter()
            .map(|s| s["state_bytes"].as_u64().unwrap())
            .collect();
        let summary = &method["summary"];
        assert_eq!(summary["state_bytes"].as_u64(), bytes.last().copied());
        let per_token = summary["bytes_per_token"].as_u64().unwrap();
        match method["method"].as_str().unwrap() {
            "softmax" => {
                // One key and one value of 8 floats per kv head and token.
                assert_eq!(per_token, 2 * (8 + 8) * 4, "{method}");
                assert!(
                    bytes.windows(2).all(|w| w[1] == w[0] + per_token),
                    "{bytes:?}"
                );
                assert_eq!(summary["memory"], "growing");
            }
            _ => {
                assert_eq!(per_token, 0, "{method}");
                assert!(bytes.iter().all(|&b| b == bytes[0]), "{bytes:?}");
                assert_eq!(summary["memory"], "constant");
            }
        }
    }
}

#[test]
fn decode_table_names_every_method_and_skips_those_without_a_causal_form() {
    let table = decode(&[]);
    for method in [
        "softmax",
        "window",
        "linear",
        "performer",
        "cosformer",
        "hybrid",
    ] {
        assert!(table.contains(method), "no {method} in:\n{table}");
    }
    assert!(
        table.contains("growing") && table.contains("constant"),
        "{table}"
    );
    let table = decode(&["--method", "linear,linformer,fnet", "--every", "3"]);
    let rows: Vec<&str> = table
        .lines()
        .filter(|line| line.trim_start().starts_with(char::is_numeric))
        .collect();
    assert_eq!(rows.len(), 3, "rows at 19, 22 and the last, 24:\n{table}");
    assert!(rows[2].trim_start().starts_with("24"), "{table}");
    assert!(
        table.contains("skipped linformer: linformer has no causal form"),
        "{table}"
    );
    assert!(
        table.contains("skipped fnet: fnet has no causal form"),
        "{table}"
    );
}

#[test]
fn decode_misuse_is_named() {
    for (args, expected) in [
        (
            &["--heads", "8", "--kv-heads", "3"][..],
            "--heads 8 is not a multiple of --kv-heads 3",
        ),
        (
            &["--method", "softmax,window", "--chunk", "8"],
            "--chunk applies to none of softmax, window",
        ),
    ] {
        let output = linattn([&["decode"][..], args].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(expected),
            "wanted {expected:?} in: {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn bench_skips_lengths_predicted_to_run_past_the_time_limit() {
    let records = bench_json(&[
        "--seq",
        "64,128",
        "--methods",
        "softmax",
        "--max-seconds",
        "0.000000001",
    ]);
    assert!(records[0]["skipped"].is_null(), "{}", records[0]);
    let reason = records[1]["skipped"].as_str().unwrap();
    assert!(
        reason.contains("predicted") && reason.contains("over the limit of"),
        "{reason}"
    );
}

#[test]
fn the_gpu_paths_name_what_they_lack() {
    let scratch = Scratch::new("gpu");
    let [q, k, v] = valid_inputs(&scratch);
    let out = scratch.path("out.npy");
    let mut run = words(&["run", "--method", "linear", "--device", "cuda", "--q"]);
    run.extend([
        path_arg(q.clone()),
        "--k".into(),
        path_arg(k),
        "--v".into(),
        path_arg(v),
    ]);
    run.extend(["--out".into(), path_arg(out)]);
    let output = linattn(&run);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        // A GPU is present: the output was written and matches the reference elsewhere.
        return;
    }
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("linattn: error: CUDA: "), "{stderr}");
    let mut with_gradients = run.clone();
    with_gradients.extend([
        "--grad-out".into(),
        path_arg(q),
        "--grads-prefix".into(),
        "g_".into(),
    ]);
    let stderr = String::from_utf8_lossy(&linattn(&with_gradients).stderr).to_string();
    assert!(
        stderr.contains("--grad-out runs on the CPU only"),
        "{stderr}"
    );
    let bench = linattn([
        "bench",
        "--device",
        "cuda",
        "--seq",
        "64",
        "--methods",
        "linear",
    ]);
    let stderr = String::from_utf8_lossy(&bench.stderr);
    assert_eq!(bench.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("linattn: error: CUDA: "), "{stderr}");
}

#[test]
fn bench_plot_writes_the_charts_as_svg() {
    let scratch = Scratch::new("plot");
    let dir = scratch.path("charts");
    let dir_arg = path_arg(dir.clone());
    bench_json(&[
        "--seq",
        "64,128",
        "--methods",
        "linear,softmax",
        "--plot",
        &dir_arg,
    ]);
    for (file, title) in [
        ("time.svg", "median time (ms) against sequence length"),
        ("memory.svg", "extra memory (bytes) against sequence length"),
        (
            "error.svg",
            "error against exact softmax against sequence length",
        ),
    ] {
        let svg = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(svg.starts_with("<svg"), "{file}");
        assert!(svg.contains(title), "{file}");
        assert!(
            svg.contains("linear, time ∝ n^"),
            "{file} has a line per method"
        );
    }
    let svg = std::fs::read_to_string(dir.join("time.svg")).unwrap();
    assert!(svg.contains("softmax, time ∝ n^"));
}
