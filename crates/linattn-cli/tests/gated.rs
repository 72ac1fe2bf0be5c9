//! `linattn run` for the gated and delta-rule family: g and β in flash-linear-attention's
//! 3-D layout, the initial state in and the final state out, against the library's f64
//! recurrence; and the inputs a method does or does not read, named.

mod common;

use common::{Scratch, linattn};
use linattn::{Attention, GateInputs, GatedDeltaRule, Method, Tensor, reference};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

fn read_npy(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = npyz::NpyFile::new(BufReader::new(file)).unwrap();
    let shape = file.shape().iter().map(|&d| d as usize).collect();
    (shape, file.into_vec().unwrap())
}

fn arg(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Values in (0, 1) from normal ones.
fn unit_interval(shape: [usize; 4], seed: u64) -> Tensor<f64> {
    let mut x = Tensor::<f64>::randn(shape, seed).unwrap();
    x.as_mut_slice()
        .iter_mut()
        .for_each(|a| *a = 1.0 / (1.0 + (-*a).exp()));
    x
}

#[test]
fn run_continues_from_a_state_and_writes_the_next() {
    let scratch = Scratch::new("gated-run");
    let (b, t, h, hv, dk, dv) = (2, 29, 2, 4, 8, 6);
    let q = Tensor::<f64>::randn([b, t, h, dk], 1).unwrap();
    let k = Tensor::<f64>::randn([b, t, h, dk], 2).unwrap();
    let v = Tensor::<f64>::randn([b, t, hv, dv], 3).unwrap();
    let mut g = unit_interval([b, t, hv, 1], 4);
    g.as_mut_slice().iter_mut().for_each(|x| *x = -*x);
    let beta = unit_interval([b, t, hv, 1], 5);
    let initial = Tensor::<f64>::randn([b, hv, dk, dv], 6).unwrap();
    let (out, state) = (scratch.path("o.npy"), scratch.path("s.npy"));
    let d_out = Tensor::<f64>::randn([b, t, hv, dv], 7).unwrap();
    let output = linattn([
        "run".to_string(),
        "--method".into(),
        "gated-delta-rule".into(),
        "--causal".into(),
        "--l2norm-qk".into(),
        "true".into(),
        "--chunk".into(),
        "8".into(),
        "--q".into(),
        arg(&scratch.tensor("q.npy", &q)),
        "--k".into(),
        arg(&scratch.tensor("k.npy", &k)),
        "--v".into(),
        arg(&scratch.tensor("v.npy", &v)),
        // g and β as flash-linear-attention has them: [B, T, HV].
        "--g".into(),
        arg(&scratch.array("g.npy", &[b, t, hv], g.as_slice())),
        "--beta".into(),
        arg(&scratch.array("beta.npy", &[b, t, hv], beta.as_slice())),
        "--initial-state".into(),
        arg(&scratch.tensor("s0.npy", &initial)),
        "--final-state".into(),
        arg(&state),
        "--out".into(),
        arg(&out),
        "--grad-out".into(),
        arg(&scratch.tensor("do.npy", &d_out)),
        "--grads-prefix".into(),
        arg(&scratch.path("grad_")),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let method = Method::GatedDeltaRule(GatedDeltaRule {
        l2norm_qk: true,
        chunk: 8,
        ..GatedDeltaRule::default()
    });
    let inputs = GateInputs {
        g: Some(&g),
        beta: Some(&beta),
        initial_state: Some(&initial),
        ..GateInputs::default()
    };
    let attention = Attention::new(method).causal(true);
    let expected = reference::forward_gated(&attention, &q, &k, &v, &inputs).unwrap();
    let grads = attention
        .backward_gated(&q, &k, &v, &inputs, &d_out, None)
        .unwrap();
    let gradient = |name: &str| scratch.path(&format!("grad_d{name}.npy"));
    let (dg, dbeta) = (grads.dg.unwrap(), grads.dbeta.unwrap());
    // dg and dbeta in the files' [B, T, HV] layout: the same values.
    for (path, want) in [
        (&out, &expected.out),
        (&state, &expected.final_state),
        (&gradient("q"), &grads.dq),
        (&gradient("k"), &grads.dk),
        (&gradient("v"), &grads.dv),
        (&gradient("g"), &dg),
        (&gradient("beta"), &dbeta),
        (&gradient("_initial_state"), &grads.d_initial_state),
    ] {
        let (shape, got) = read_npy(path);
        assert_eq!(
            shape.iter().product::<usize>(),
            want.shape().iter().product::<usize>()
        );
        let error = got
            .iter()
            .zip(want.as_slice())
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(error < 1e-12, "{}: {error:e}", path.display());
    }
}

#[test]
fn inputs_a_method_reads_or_does_not_are_named() {
    let scratch = Scratch::new("gated-misuse");
    let x = Tensor::<f32>::randn([1, 10, 2, 4], 0).unwrap();
    let x = arg(&scratch.tensor("x.npy", &x));
    let gates = arg(&scratch.array("g.npy", &[1, 10, 2], &[-0.5f32; 20]));
    let out = arg(&scratch.path("o.npy"));
    let run = |method: &str, extra: &[&str]| {
        let mut args = vec!["run", "--method", method, "--causal"];
        args.extend(["--q", &x, "--k", &x, "--v", &x, "--out", &out]);
        args.extend(extra);
        let output = linattn(&args);
        assert_eq!(output.status.code(), Some(2), "{method} {extra:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run("gla", &[]).contains("gla needs --g"));
    assert!(run("delta-rule", &[]).contains("delta-rule needs --beta"));
    assert!(run("retention", &["--g", &gates]).contains("retention reads no g"));
    assert!(run("linear", &["--final-state", &out]).contains("--final-state are for"));
    // A positive log decay, at its position.
    let positive = arg(&scratch.array(
        "p.npy",
        &[1, 10, 2],
        &[[-0.5f32; 13].as_slice(), &[0.5], &[-0.5; 6]].concat(),
    ));
    let message = run("gla", &["--g", &positive]);
    assert!(
        message.contains("[0, 6, 1, 0]") && message.contains("≤ 0"),
        "{message}"
    );
}
