//! `linattn explore` tested as the page uses it: its HTTP API on a server started the way
//! a user starts it.

mod common;

use common::Server;
use npyz::WriterBuilder;
use serde_json::json;

#[test]
fn serves_the_page_and_its_assets_from_loopback() {
    let server = Server::start();
    assert!(
        server.url.starts_with("http://127.0.0.1:"),
        "{}",
        server.url
    );
    let (status, page) = server.text("/");
    assert_eq!(status, 200);
    assert!(page.contains("/vendor/uPlot.iife.min.js") && page.contains("/app.js"));
    let (status, plot) = server.text("/vendor/uPlot.iife.min.js");
    assert_eq!(status, 200);
    assert!(plot.len() > 10_000, "the plotting library is served whole");
    let (status, info) = server.get("/api/info");
    assert_eq!(status, 200);
    let names: Vec<&str> = info["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "softmax",
            "softmax-naive",
            "window",
            "linear",
            "performer",
            "cosformer",
            "linformer",
            "fnet",
            "hybrid",
            "retention",
            "gla",
            "delta-rule",
            "gated-delta-rule"
        ]
    );
    assert!(info["copy_bytes_per_s"].as_f64().unwrap() > 1e8);
}

#[test]
fn measures_a_sweep_and_answers_a_repeat_from_the_cache() {
    let server = Server::start();
    let request = json!({
        "methods": ["linear", "softmax"], "min_seq": 64, "max_seq": 256,
        "heads": 2, "dim": 16, "causal": true
    })
    .to_string();
    let (status, job) = server.post("/api/measure", &request);
    assert_eq!(status, 202, "{job}");
    let job = server.wait(job["id"].as_u64().unwrap());
    assert_eq!(job["state"], "done");
    let records = job["records"].as_array().unwrap();
    assert_eq!(records.len(), 6, "3 lengths x 2 methods");
    for record in records {
        assert!(record["skipped"].is_null(), "{record}");
        assert!(record["median_ms"].as_f64().unwrap() > 0.0, "{record}");
        assert_eq!(record["causal"], true);
    }
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [64, 64, 128, 128, 256, 256]);
    // linear approximates softmax: a real error; softmax against itself: rounding.
    let linear_error = records[0]["rel_err"].as_f64().unwrap();
    let softmax_error = records[1]["rel_err"].as_f64().unwrap();
    assert!(
        linear_error > 1e-2 && softmax_error < 1e-5,
        "{linear_error} {softmax_error}"
    );
    assert!(
        records[0]["time_exponent"].is_f64(),
        "growth fitted: {}",
        records[0]
    );

    let (_, again) = server.post("/api/measure", &request);
    let again = server.wait(again["id"].as_u64().unwrap());
    assert_eq!(
        again["records"], job["records"],
        "the same cases come from the cache"
    );
}

#[test]
fn bad_requests_get_errors_and_the_server_stays_up() {
    let server = Server::start();
    let cases = [
        ("{\"methods\": [\"linear\"", 400, "malformed request"),
        (
            "{\"methods\": [\"nope\"], \"max_seq\": 256, \"heads\": 1, \"dim\": 8}",
            400,
            "no method \"nope\"; choose from softmax",
        ),
        (
            "{\"methods\": [\"linear\"], \"max_seq\": 256, \"heads\": 1, \"dim\": 8, \"extra\": 1}",
            400,
            "unknown field",
        ),
        (
            "{\"methods\": [\"linear\"], \"max_seq\": 99999999, \"heads\": 1, \"dim\": 8}",
            422,
            "max_seq must be between",
        ),
        (
            "{\"methods\": [], \"max_seq\": 256, \"heads\": 1, \"dim\": 8}",
            422,
            "methods must be between",
        ),
        (
            "{\"methods\": [\"linear\", \"linear\"], \"max_seq\": 256, \"heads\": 1, \"dim\": 8}",
            422,
            "listed twice",
        ),
        (
            "{\"methods\": [\"linear\"], \"max_seq\": 1048576, \"heads\": 64, \"dim\": 256}",
            422,
            "need",
        ),
    ];
    for (body, status, message) in cases {
        let (got, answer) = server.post("/api/measure", body);
        assert_eq!(got, status, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(message),
            "{body}: {answer}"
        );
    }
    let huge = format!(
        "{{\"methods\": [\"linear\"], \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let (status, answer) = server.post("/api/measure", &huge);
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 64.00 KiB"),
        "{answer}"
    );
    assert_eq!(server.get("/api/jobs/12345").0, 404);
    assert_eq!(server.delete("/api/jobs/12345").0, 404);
    assert_eq!(server.get("/no/such/page").0, 404);
    assert_eq!(server.get("/api/info").0, 200, "still serving");
}

#[test]
fn a_long_measurement_can_be_cancelled_and_the_queue_goes_on() {
    let server = Server::start();
    let long = json!({"methods": ["softmax-naive"], "min_seq": 1024, "max_seq": 65536, "heads": 8, "dim": 64});
    let (_, first) = server.post("/api/measure", &long.to_string());
    let quick = json!({"methods": ["linear"], "min_seq": 64, "max_seq": 64, "heads": 1, "dim": 8});
    let (_, second) = server.post("/api/measure", &quick.to_string());
    assert_eq!(second["position"], 1, "queued behind the first: {second}");
    let (status, cancelled) = server.delete(&format!("/api/jobs/{}", first["id"]));
    assert_eq!(status, 200, "{cancelled}");
    let first = server.wait(first["id"].as_u64().unwrap());
    assert_eq!(first["state"], "cancelled");
    assert!(
        first["done"].as_u64().unwrap() < first["total"].as_u64().unwrap(),
        "{first}"
    );
    let second = server.wait(second["id"].as_u64().unwrap());
    assert_eq!(second["state"], "done");
    assert_eq!(second["records"].as_array().unwrap().len(), 1);
}

#[test]
fn attention_maps_are_weights_and_approximations_differ_from_exact() {
    let server = Server::start();
    let (status, maps) = server.post(
        "/api/maps",
        &json!({"methods": ["linear", "window", "fnet"], "seq": 12, "dim": 8, "causal": true, "window": 3}).to_string(),
    );
    assert_eq!(status, 200, "{maps}");
    let exact = maps["exact"].as_array().unwrap();
    assert_eq!(exact.len(), 12);
    for (i, row) in exact.iter().enumerate() {
        let row: Vec<f64> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(
            (row.iter().sum::<f64>() - 1.0).abs() < 1e-5,
            "row {i} sums to 1"
        );
        assert!(
            row[i + 1..].iter().all(|&w| w == 0.0),
            "causal: no weight on later keys"
        );
    }
    let by_method = |name: &str| {
        maps["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["method"] == name)
            .unwrap()
            .clone()
    };
    let linear = by_method("linear");
    assert!(linear["rel_err"].as_f64().unwrap() > 1e-2, "{linear}");
    let window = by_method("window");
    let last = window["weights"][11].as_array().unwrap();
    assert!(
        last[..8].iter().all(|w| w.as_f64() == Some(0.0)),
        "window of 3: {window}"
    );
    assert!(by_method("fnet")["weights"].is_null());
    let (status, answer) = server.post(
        "/api/maps",
        &json!({"methods": ["linear"], "seq": 5000, "dim": 8}).to_string(),
    );
    assert_eq!(status, 422, "{answer}");
}

#[test]
fn the_decoding_panel_shows_growing_and_constant_state() {
    let server = Server::start();
    let (status, report) = server.post(
        "/api/decode",
        &json!({"methods": ["softmax", "linear"], "prompt_len": 32, "tokens": 16, "heads": 2, "dim": 16}).to_string(),
    );
    assert_eq!(status, 200, "{report}");
    let methods = report["methods"].as_array().unwrap();
    let memory = |name: &str| {
        let method = methods.iter().find(|m| m["method"] == name).unwrap();
        assert!(
            method["summary"]["median_step_us"].as_f64().unwrap() > 0.0,
            "{method}"
        );
        method["summary"]["memory"].as_str().unwrap().to_string()
    };
    assert_eq!(memory("softmax"), "growing");
    assert_eq!(memory("linear"), "constant");
    let (status, answer) = server.post(
        "/api/decode",
        &json!({"methods": ["linformer"], "prompt_len": 32, "tokens": 16, "heads": 2, "dim": 16})
            .to_string(),
    );
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("no recurrent form"),
        "{answer}"
    );
}

/// A .npy file of `shape` holding `f(index)` in float32.
fn npy(shape: [u64; 4], f: impl Fn(usize) -> f32) -> Vec<u8> {
    let count = shape.iter().product::<u64>() as usize;
    let mut bytes = Vec::new();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(&mut bytes)
        .begin_nd()
        .unwrap();
    writer.extend((0..count).map(&f)).unwrap();
    writer.finish().unwrap();
    bytes
}

#[test]
fn uploaded_inputs_are_measured_and_mapped() {
    let server = Server::start();
    let (_, state) = server.get("/api/inputs");
    assert_eq!(state["ready"], false);
    let wave = |i: usize| ((i * 7919) % 101) as f32 / 50.0 - 1.0;
    for (role, shape) in [
        ("q", [1, 40, 2, 8]),
        ("k", [1, 40, 1, 8]),
        ("v", [1, 40, 1, 8]),
    ] {
        let (status, state) = server.put(&format!("/api/inputs/{role}"), npy(shape, wave));
        assert_eq!(status, 200, "{state}");
    }
    let (_, state) = server.get("/api/inputs");
    assert_eq!(state["ready"], true, "{state}");
    assert_eq!(state["q"], json!([1, 40, 2, 8]));

    let request = json!({"methods": ["linear"], "min_seq": 16, "max_seq": 1024, "heads": 8, "dim": 64, "inputs": "uploaded"});
    let (status, job) = server.post("/api/measure", &request.to_string());
    assert_eq!(status, 202, "{job}");
    let job = server.wait(job["id"].as_u64().unwrap());
    let seqs: Vec<u64> = job["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        [16, 32, 40],
        "prefixes of the upload, up to its length"
    );
    assert_eq!(job["records"][0]["heads"], 2, "shape taken from the upload");

    let (status, maps) = server.post(
        "/api/maps",
        &json!({"methods": ["linear"], "seq": 100, "dim": 8, "inputs": "uploaded"}).to_string(),
    );
    assert_eq!(status, 200, "{maps}");
    assert_eq!(maps["seq"], 40);

    let (status, answer) = server.put("/api/inputs/k", npy([1, 41, 1, 8], wave));
    assert_eq!(status, 200);
    assert!(
        answer["problem"].as_str().unwrap().contains("do not fit"),
        "{answer}"
    );
    let (status, answer) = server.post("/api/measure", &request.to_string());
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = server.put("/api/inputs/q", b"not a numpy file".to_vec());
    assert_eq!(status, 422);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not a valid .npy"),
        "{answer}"
    );
    assert_eq!(server.put("/api/inputs/w", npy([1, 1, 1, 1], wave)).0, 404);
}

#[test]
fn a_real_models_attention_inputs_are_bundled() {
    let server = Server::start();
    let request = json!({"methods": ["linear", "performer"], "min_seq": 64, "max_seq": 4096,
                         "heads": 1, "dim": 8, "features": 64, "inputs": "model"});
    let (status, job) = server.post("/api/measure", &request.to_string());
    assert_eq!(status, 202, "{job}");
    let job = server.wait(job["id"].as_u64().unwrap());
    let records = job["records"].as_array().unwrap();
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        [64, 64, 128, 128, 256, 256, 304, 304],
        "up to the 304 captured tokens"
    );
    for record in records {
        assert_eq!(
            (record["heads"].as_u64(), record["dim"].as_u64()),
            (Some(12), Some(32))
        );
        let error = record["rel_err"].as_f64().unwrap();
        assert!(
            error > 1e-3 && error < 10.0,
            "an approximation error on real inputs: {record}"
        );
    }
    let (status, maps) = server.post(
        "/api/maps",
        &json!({"methods": ["linear"], "seq": 48, "dim": 8, "inputs": "model"}).to_string(),
    );
    assert_eq!(status, 200, "{maps}");
    assert_eq!(maps["seq"], 48);
    // Real attention is far from uniform: some query puts most of its weight on few keys.
    let peak = maps["exact"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|w| w.as_f64().unwrap()))
        .fold(0.0, f64::max);
    assert!(peak > 0.2, "largest weight {peak}");
}

#[test]
fn the_gated_family_is_measured_on_the_models_inputs_with_random_gates() {
    let server = Server::start();
    let methods = ["retention", "gla", "delta-rule", "gated-delta-rule"];
    // Each layer's own gate (GLA's per key channel, Gated DeltaNet's per head), then KDA's.
    for (gate, expected) in [
        (
            json!(null),
            [json!(null), json!("channel"), json!(null), json!("head")],
        ),
        (
            json!("channel"),
            [json!(null), json!("channel"), json!(null), json!("channel")],
        ),
    ] {
        let request = json!({"methods": methods, "min_seq": 128, "max_seq": 4096, "heads": 1,
                             "dim": 8, "causal": true, "inputs": "model", "gate": gate});
        let (status, job) = server.post("/api/measure", &request.to_string());
        assert_eq!(status, 202, "{job}");
        let job = server.wait(job["id"].as_u64().unwrap());
        assert_eq!(job["state"], "done", "{job}");
        let records = job["records"].as_array().unwrap();
        assert_eq!(
            records.len(),
            3 * methods.len(),
            "128, 256 and all 304 tokens"
        );
        for (index, record) in records.iter().enumerate() {
            assert_eq!(record["method"], methods[index % methods.len()], "{record}");
            assert!(record["skipped"].is_null(), "{record}");
            assert!(record["median_ms"].as_f64().unwrap() > 0.0, "{record}");
            assert!(record["rel_err"].as_f64().unwrap().is_finite(), "{record}");
            assert_eq!(
                (record["heads"].as_u64(), record["dim"].as_u64()),
                (Some(12), Some(32))
            );
            assert_eq!(record["gate"], expected[index % methods.len()], "{record}");
        }
    }
}
