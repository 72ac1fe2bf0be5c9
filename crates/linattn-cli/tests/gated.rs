//! `linattn run` for the gated and delta-rule family: g and β in flash-linear-attention's
//! 3-D layout, the initial state in and the final state out, against the library's f64
//! recurrence; packed sequences against separate runs; the gate's raw inputs against g
//! and β computed from them; the inputs a method does or does not read, named; and the
//! gate `bench` and `decode` draw, named in their records.

mod common;

use common::{Scratch, linattn};
use linattn::{Attention, GateInputs, GatedDeltaRule, Method, Tensor, reference};
use std::fs::File;
use std::io::BufReader;
use std::ops::Range;
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

/// Runs `linattn` and fails with its message unless it succeeds.
fn succeed(args: &[String]) {
    let output = linattn(args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The largest difference between two arrays of one size.
fn max_difference(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
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
    // g and β were given [B, T, HV]: so are their gradients, as flash-linear-attention's.
    assert_eq!(read_npy(&gradient("g")).0, [b, t, hv]);
    assert_eq!(read_npy(&gradient("beta")).0, [b, t, hv]);
}

#[test]
fn packed_sequences_run_as_separate_runs_each_from_its_own_state() {
    let scratch = Scratch::new("gated-packed");
    let (lengths, h, hv, dk, dv) = ([7, 13, 9], 2, 4, 8, 6);
    let total: usize = lengths.iter().sum();
    let q = Tensor::<f64>::randn([1, total, h, dk], 1).unwrap();
    let k = Tensor::<f64>::randn([1, total, h, dk], 2).unwrap();
    let v = Tensor::<f64>::randn([1, total, hv, dv], 3).unwrap();
    // A gate per key channel (KDA) and β as flash-linear-attention gives it, [B, T, HV].
    let mut g = unit_interval([1, total, hv, dk], 4);
    g.as_mut_slice().iter_mut().for_each(|x| *x = -*x);
    let beta = unit_interval([1, total, hv, 1], 5);
    let initial = Tensor::<f64>::randn([lengths.len(), hv, dk, dv], 6).unwrap();
    let d_out = Tensor::<f64>::randn([1, total, hv, dv], 7).unwrap();
    // Tokens `range` of a per-token input, as a file of its own shape.
    let rows = |tensor: &Tensor<f64>, range: &Range<usize>| {
        let [_, _, a, b] = tensor.shape();
        let values = &tensor.as_slice()[range.start * a * b..range.end * a * b];
        (vec![1, range.len(), a, b], values.to_vec())
    };
    let state_size = hv * dk * dv;
    // One run of the tokens `range` from `states` (one per sequence of `cu_seqlens`):
    // its output, final states, dq, dk, dv, dg, dbeta and initial states' gradient.
    let run = |name: &str, range: Range<usize>, states: &[f64], cu_seqlens: Option<&str>| {
        let file = |role: &str, (shape, values): (Vec<usize>, Vec<f64>)| {
            arg(&scratch.array(&format!("{name}_{role}.npy"), &shape, &values))
        };
        let (beta_shape, beta_values) = rows(&beta, &range);
        let sequences = states.len() / state_size;
        let mut args: Vec<String> = [
            "run",
            "--method",
            "gated-delta-rule",
            "--causal",
            "--l2norm-qk",
            "true",
            "--chunk",
            "4",
        ]
        .map(String::from)
        .to_vec();
        for (flag, path) in [
            ("--q", file("q", rows(&q, &range))),
            ("--k", file("k", rows(&k, &range))),
            ("--v", file("v", rows(&v, &range))),
            ("--g", file("g", rows(&g, &range))),
            (
                "--beta",
                file("beta", (beta_shape[..3].to_vec(), beta_values)),
            ),
            (
                "--initial-state",
                file("s0", (vec![sequences, hv, dk, dv], states.to_vec())),
            ),
            ("--grad-out", file("do", rows(&d_out, &range))),
            ("--out", arg(&scratch.path(&format!("{name}_o.npy")))),
            (
                "--final-state",
                arg(&scratch.path(&format!("{name}_s.npy"))),
            ),
            ("--grads-prefix", arg(&scratch.path(&format!("{name}_")))),
        ] {
            args.extend([flag.to_string(), path]);
        }
        if let Some(offsets) = cu_seqlens {
            args.extend(["--cu-seqlens".to_string(), offsets.to_string()]);
        }
        succeed(&args);
        ["o", "s", "dq", "dk", "dv", "dg", "dbeta", "d_initial_state"]
            .map(|output| read_npy(&scratch.path(&format!("{name}_{output}.npy"))))
    };
    let packed = run("packed", 0..total, initial.as_slice(), Some("0,7,20,29"));
    assert_eq!(
        packed[1].0,
        [lengths.len(), hv, dk, dv],
        "a state per sequence"
    );
    let mut start = 0;
    for (n, length) in lengths.into_iter().enumerate() {
        let range = start..start + length;
        start += length;
        let states = n * state_size..(n + 1) * state_size;
        let alone = run(
            &format!("seq{n}"),
            range.clone(),
            &initial.as_slice()[states.clone()],
            None,
        );
        for (index, (shape, got)) in packed.iter().enumerate() {
            // The states and their gradients are per sequence, the rest per token.
            let inner: usize = shape[2..].iter().product();
            let own = match index {
                1 | 7 => &got[states.clone()],
                _ => &got[range.start * inner..range.end * inner],
            };
            let error = max_difference(own, &alone[index].1);
            assert!(error < 1e-12, "sequence {n}, output {index}: {error:e}");
        }
    }
    // Offsets that do not cover the tokens in order are named, and nothing panics.
    let x = |role: &str, tensor: &Tensor<f64>| arg(&scratch.tensor(role, tensor));
    let files = [
        ("--q", x("q.npy", &q)),
        ("--k", x("k.npy", &k)),
        ("--v", x("v.npy", &v)),
        ("--g", x("g.npy", &g)),
        ("--beta", x("beta.npy", &beta)),
        ("--out", arg(&scratch.path("o.npy"))),
    ];
    for (offsets, message) in [
        ("0,7,5,29", "must not decrease: offset 2 is 5 after 7"),
        ("1,29", "must start at 0, not 1"),
        ("0,7,28", "must end at the length 29, not 28"),
        ("0,seven,29", "invalid digit"),
    ] {
        let mut args = vec!["run", "--method", "gated-delta-rule", "--causal"];
        args.extend(files.iter().flat_map(|(flag, path)| [*flag, path.as_str()]));
        args.extend(["--cu-seqlens", offsets]);
        let output = linattn(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{offsets}: {stderr}");
        assert!(
            stderr.contains(message) && !stderr.contains("panicked"),
            "{offsets}: {stderr}"
        );
    }
}

#[test]
fn raw_gate_inputs_give_the_gates_computed_from_them_and_their_gradients() {
    let scratch = Scratch::new("gated-raw");
    let (b, t, h, hv, dk, dv) = (2, 21, 2, 4, 8, 6);
    let q = arg(&scratch.tensor("q.npy", &Tensor::<f64>::randn([b, t, h, dk], 1).unwrap()));
    let k = arg(&scratch.tensor("k.npy", &Tensor::<f64>::randn([b, t, h, dk], 2).unwrap()));
    let v = arg(&scratch.tensor("v.npy", &Tensor::<f64>::randn([b, t, hv, dv], 3).unwrap()));
    let d_out = Tensor::<f64>::randn([b, t, hv, dv], 4).unwrap();
    let d_out = arg(&scratch.tensor("do.npy", &d_out));
    // Gated DeltaNet's gate per head, a [B, T, HV] as flash-linear-attention gives it, with
    // β from logits; GLA's per key channel, with a dt_bias per channel.
    for (method, width) in [("gated-delta-rule", 1), ("gla", dk)] {
        let delta = method == "gated-delta-rule";
        let a_shape = if width == 1 {
            vec![b, t, hv]
        } else {
            vec![b, t, hv, dk]
        };
        let a = Tensor::<f64>::randn([b, t, hv, width], 5).unwrap();
        let a = a.as_slice();
        let a_log: Vec<f64> = (0..hv).map(|i| 0.4 * i as f64 - 0.6).collect();
        let dt_bias = Tensor::<f64>::randn([1, 1, hv, width], 6).unwrap();
        let dt_bias = dt_bias.as_slice();
        let logits = Tensor::<f64>::randn([b, t, hv, 1], 7).unwrap();
        let logits = logits.as_slice();
        // Element i of a: its value head and its dt_bias.
        let head = |i: usize| (i / width) % hv;
        let bias = |i: usize| head(i) * width + i % width;
        let g: Vec<f64> = (0..a.len())
            .map(|i| -a_log[head(i)].exp() * (a[i] + dt_bias[bias(i)]).exp().ln_1p())
            .collect();
        let beta: Vec<f64> = logits.iter().map(|&x| sigmoid(x)).collect();
        let run = |name: &str, gates: &[(&str, String)]| {
            let mut args: Vec<String> = ["run", "--method", method, "--causal", "--chunk", "8"]
                .map(String::from)
                .to_vec();
            if delta {
                args.extend(["--l2norm-qk".to_string(), "true".to_string()]);
            }
            let prefix = arg(&scratch.path(&format!("{method}_{name}_")));
            let out = arg(&scratch.path(&format!("{method}_{name}_o.npy")));
            for (flag, path) in [
                ("--q", q.clone()),
                ("--k", k.clone()),
                ("--v", v.clone()),
                ("--grad-out", d_out.clone()),
                ("--out", out),
                ("--grads-prefix", prefix),
            ]
            .into_iter()
            .chain(gates.iter().map(|(flag, path)| (*flag, path.clone())))
            {
                args.extend([flag.to_string(), path]);
            }
            succeed(&args);
        };
        let file = |name: &str, shape: &[usize], values: &[f64]| {
            arg(&scratch.array(&format!("{method}_{name}.npy"), shape, values))
        };
        let mut given = vec![("--g", file("g", &a_shape, &g))];
        let mut raw = vec![
            ("--gate-a", file("a", &a_shape, a)),
            ("--a-log", file("a_log", &[hv], &a_log)),
            ("--dt-bias", file("dt_bias", &[dt_bias.len()], dt_bias)),
        ];
        if delta {
            given.push(("--beta", file("beta", &[b, t, hv], &beta)));
            raw.push(("--beta-logits", file("logits", &[b, t, hv], logits)));
        }
        run("given", &given);
        run("raw", &raw);
        let read = |name: &str, output: &str| {
            read_npy(&scratch.path(&format!("{method}_{name}_{output}.npy")))
        };
        let given = |output| read("given", output);
        let raw = |output| read("raw", output);
        for output in ["o", "dq", "dk", "dv"] {
            let error = max_difference(&raw(output).1, &given(output).1);
            assert!(error < 1e-12, "{method} {output}: {error:e}");
        }
        // The chain rule from ∂g and ∂β of the run given g and β, each gradient in its
        // input's shape (g's as given too).
        let (dg_shape, dg) = given("dg");
        assert_eq!(dg_shape, a_shape, "{method}: dg in g's shape");
        let mut da = vec![0.0; a.len()];
        let mut d_a_log = vec![0.0; hv];
        let mut d_dt_bias = vec![0.0; dt_bias.len()];
        for i in 0..a.len() {
            da[i] = dg[i] * -a_log[head(i)].exp() * sigmoid(a[i] + dt_bias[bias(i)]);
            d_a_log[head(i)] += dg[i] * g[i];
            d_dt_bias[bias(i)] += da[i];
        }
        let mut expected = vec![
            ("da", a_shape.clone(), da),
            ("dA_log", vec![hv], d_a_log),
            ("ddt_bias", vec![dt_bias.len()], d_dt_bias),
        ];
        if delta {
            let (dbeta_shape, dbeta) = given("dbeta");
            assert_eq!(dbeta_shape, [b, t, hv]);
            let d_logits = dbeta
                .iter()
                .zip(&beta)
                .map(|(d, s)| d * s * (1.0 - s))
                .collect();
            expected.push(("dbeta_logits", vec![b, t, hv], d_logits));
        }
        for (name, shape, want) in expected {
            let (got_shape, got) = raw(name);
            assert_eq!(got_shape, shape, "{method} {name}");
            let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let error = max_difference(&got, &want) / scale;
            assert!(error < 1e-12, "{method} {name}: {error:e}");
        }
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
    assert!(run("linear", &["--cu-seqlens", "0,10"]).contains("--cu-seqlens is for"));
    // The gate's raw inputs go together, in place of g; β's logits in place of β.
    let raw = ["--gate-a", &gates, "--a-log", &x, "--dt-bias", &x];
    assert!(run("retention", &raw).contains("retention reads no g; leave --gate-a out"));
    let message = run("gla", &[&raw[..], &["--g", &gates]].concat());
    assert!(
        message.contains("'--gate-a <FILE>' cannot be used with '--g <FILE>'"),
        "{message}"
    );
    let message = run("gla", &raw[..2]);
    assert!(
        message.contains("--a-log <FILE>") && message.contains("--dt-bias <FILE>"),
        "{message}"
    );
    let message = run("delta-rule", &["--beta", &gates, "--beta-logits", &gates]);
    assert!(message.contains("cannot be used with"), "{message}");
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

/// Runs `linattn` with `args` and parses the JSON it prints.
fn json(args: &[&str]) -> serde_json::Value {
    let output = linattn(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn bench_and_decode_name_the_gate_their_random_g_is_drawn_with() {
    let tiny = ["--heads", "2", "--dim", "8"];
    let methods = "retention,gla,delta-rule,gated-delta-rule";
    let bench = |gate: &[&str]| {
        let mut args = vec![
            "bench",
            "--json",
            "--causal",
            "--seq",
            "32",
            "--methods",
            methods,
        ];
        args.extend(tiny.iter().chain(gate));
        json(&args)
    };
    let decode = |gate: &[&str]| {
        let mut args = vec!["decode", "--json", "--prompt-len", "8", "--tokens", "2"];
        args.extend(["--method", methods].iter().chain(&tiny).chain(gate));
        json(&args)["methods"].clone()
    };
    let gates = |records: &serde_json::Value| -> Vec<(String, serde_json::Value)> {
        let records = records.as_array().unwrap();
        for record in records {
            assert!(record["skipped"].is_null(), "{record}");
        }
        records
            .iter()
            .map(|r| (r["method"].as_str().unwrap().to_string(), r["gate"].clone()))
            .collect()
    };
    let expect = |gla: &str, gated_delta_rule: &str| {
        [
            ("retention", serde_json::Value::Null),
            ("gla", gla.into()),
            ("delta-rule", serde_json::Value::Null),
            ("gated-delta-rule", gated_delta_rule.into()),
        ]
        .map(|(method, gate)| (method.to_string(), gate))
        .to_vec()
    };
    // Each layer's own gate by default: GLA's per key channel, Gated DeltaNet's per head;
    // KDA's and simple GLA's when asked.
    assert_eq!(gates(&bench(&[])), expect("channel", "head"));
    assert_eq!(
        gates(&bench(&["--gate", "channel"])),
        expect("channel", "channel")
    );
    assert_eq!(gates(&decode(&["--gate", "head"])), expect("head", "head"));
    assert_eq!(gates(&decode(&[])), expect("channel", "head"));
    // The tables name the gate beside the method.
    let output = linattn([
        "bench",
        "--causal",
        "--seq",
        "32",
        "--methods",
        "gated-delta-rule",
        "--gate",
        "channel",
        "--heads",
        "2",
        "--dim",
        "8",
    ]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("\ngated-delta-rule (channel gate)  yes"),
        "{table}"
    );
    // A gate for methods that read none is refused.
    let output = linattn(["bench", "--methods", "linear,retention", "--gate", "head"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--gate applies to none of linear, retention"),
        "{stderr}"
    );
}
