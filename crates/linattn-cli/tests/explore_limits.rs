//! `linattn explore` holds every request to a time and a memory limit, stops work nobody
//! waits for any more, keeps one copy of uploaded inputs and frees it, bounds its queue,
//! and answers only its own page.

mod common;

use common::{Scratch, Server};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A non-causal tiled softmax sweep of one length whose least possible time per call on
/// this server's machine (its cost at the ceilings the server measured) is about
/// `seconds`.
fn softmax_taking(server: &Server, seconds: f64) -> Value {
    let (_, info) = server.get("/api/info");
    let rate = info["matmul_flops_per_s"].as_f64().unwrap();
    // 8 heads of 64 dims: 2 · 8 · n² · (64 + 64) flops.
    let n = (seconds * rate / 2048.0).sqrt() as usize / 16 * 16;
    json!({"methods": ["softmax"], "min_seq": n, "max_seq": n, "heads": 8, "dim": 64})
}

/// Polls job `id` until its current case is running.
fn wait_until_running(server: &Server, id: u64) {
    let start = Instant::now();
    loop {
        let (_, job) = server.get(&format!("/api/jobs/{id}"));
        if job["state"] == "running" && !job["current"].is_null() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{job}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_case_past_the_time_limit_is_stopped_and_one_without_a_measurement_is_predicted() {
    let server = Server::start_with(&["--case-seconds", "1"], None);
    // At least four calls (a warm-up and three timed) of at least 0.3 s each: over the
    // limit, though the prediction (a call's floor against half the limit) lets it start.
    let request = softmax_taking(&server, 0.3);
    let start = Instant::now();
    let (status, job) = server.post("/api/measure", &request.to_string());
    assert_eq!(status, 202, "{job}");
    let job = server.wait(job["id"].as_u64().unwrap());
    let reason = job["records"][0]["skipped"].as_str().unwrap_or("");
    assert!(reason.contains("time limit"), "{job}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );

    // The first length of a sweep has no earlier one to predict from: its cost does.
    let request = softmax_taking(&server, 3.0);
    let start = Instant::now();
    let (_, job) = server.post("/api/measure", &request.to_string());
    let job = server.wait(job["id"].as_u64().unwrap());
    let reason = job["records"][0]["skipped"].as_str().unwrap_or("");
    assert!(reason.contains("predicted at least"), "{job}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

/// The median milliseconds of the one record of `job`.
fn median_ms(job: &Value) -> f64 {
    job["records"][0]["median_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("measured: {job}"))
}

#[test]
fn a_length_after_a_cached_one_is_predicted_from_it() {
    // A length with no f64 reference (past its work limit), its call about 0.1 s.
    let first = Server::start();
    let (_, info) = first.get("/api/info");
    let rate = info["matmul_flops_per_s"].as_f64().unwrap();
    let n = ((0.1 * rate / 2048.0).sqrt() as usize / 16 * 16).max(4608);
    let sweep = |max: usize| {
        json!({"methods": ["softmax"], "min_seq": n, "max_seq": max, "heads": 8, "dim": 64})
            .to_string()
    };
    let (_, job) = first.post("/api/measure", &sweep(n));
    let ms = median_ms(&first.wait(job["id"].as_u64().unwrap()));
    drop(first);
    // A limit six calls long: this length's case (a warm-up and three runs) fits, and
    // twice the length (four times the work, two calls at least) does not.
    let limit = format!("{}", 6.0 * ms * 1e-3);
    let server = Server::start_with(&["--case-seconds", &limit], None);
    let (_, job) = server.post("/api/measure", &sweep(n));
    let cached = server.wait(job["id"].as_u64().unwrap());
    median_ms(&cached);
    let (_, job) = server.post("/api/measure", &sweep(2 * n));
    let job = server.wait(job["id"].as_u64().unwrap());
    let records = job["records"].as_array().unwrap();
    assert_eq!(
        records[0], cached["records"][0],
        "the first length is cached"
    );
    let reason = records[1]["skipped"].as_str().unwrap_or("");
    assert!(reason.contains("from the last length"), "{job}");
}

#[test]
fn cancel_stops_a_running_case_within_a_second() {
    let server = Server::start_with(&["--case-seconds", "60"], None);
    let request = softmax_taking(&server, 3.0);
    let (_, job) = server.post("/api/measure", &request.to_string());
    let id = job["id"].as_u64().unwrap();
    wait_until_running(&server, id);
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    server.delete(&format!("/api/jobs/{id}"));
    let job = server.wait(id);
    assert_eq!(job["state"], "cancelled");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "cancelled after {:?}",
        start.elapsed()
    );
    // The cores are free again at once: a small sweep runs now.
    let quick = json!({"methods": ["linear"], "min_seq": 64, "max_seq": 64, "heads": 1, "dim": 8});
    let (_, next) = server.post("/api/measure", &quick.to_string());
    assert_eq!(server.wait(next["id"].as_u64().unwrap())["state"], "done");
}

/// Child processes of `pid` whose command line contains `word` (Linux).
fn children_running(pid: u32, word: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|entry| {
            let dir = entry.ok()?.path();
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let parent: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let command = std::fs::read(dir.join("cmdline")).ok()?;
            (parent == pid && String::from_utf8_lossy(&command).contains(word)).then_some(())
        })
        .count()
}

#[cfg(target_os = "linux")]
#[test]
fn decoding_has_a_time_limit_and_stops_when_the_client_goes_away() {
    let server = Server::start_with(&["--case-seconds", "1"], None);
    let long =
        json!({"methods": ["softmax"], "prompt_len": 65536, "tokens": 4096, "heads": 8, "dim": 64})
            .to_string();
    let start = Instant::now();
    let (status, answer) = server.post("/api/decode", &long);
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("time limit"),
        "{answer}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    let server = Server::start_with(&["--case-seconds", "600"], None);
    let url = format!("{}/api/decode", server.url);
    let client = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(2000)))
            .build()
            .into();
        agent
            .post(url)
            .header("content-type", "application/json")
            .send(&long)
            .is_err()
    });
    let start = Instant::now();
    while children_running(server.pid(), "decode") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "linattn decode never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        client.join().unwrap(),
        "the decode was meant to outlast the client"
    );
    let start = Instant::now();
    while children_running(server.pid(), "decode") > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "linattn decode still runs after its client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And it no longer holds the cores: a sweep starts and ends.
    let quick = json!({"methods": ["linear"], "min_seq": 64, "max_seq": 64, "heads": 1, "dim": 8});
    let (_, next) = server.post("/api/measure", &quick.to_string());
    assert_eq!(server.wait(next["id"].as_u64().unwrap())["state"], "done");
}

#[test]
fn the_memory_budget_bounds_what_a_case_may_hold() {
    let server = Server::start_with(&["--memory-budget", "64M"], None);
    let (_, info) = server.get("/api/info");
    assert_eq!(info["memory_budget_bytes"], 64 << 20);
    // Naive softmax at 4096 tokens holds a 64 MiB score matrix per head in flight.
    let request = json!({"methods": ["softmax-naive", "linear"], "min_seq": 4096, "max_seq": 4096, "heads": 2, "dim": 16});
    let (_, job) = server.post("/api/measure", &request.to_string());
    let job = server.wait(job["id"].as_u64().unwrap());
    let records = job["records"].as_array().unwrap();
    let reason = records[0]["skipped"].as_str().unwrap_or("");
    assert!(
        reason.contains("needs") || reason.contains("budget"),
        "{job}"
    );
    assert!(
        records[1]["median_ms"].as_f64().is_some(),
        "linear fits: {job}"
    );
    // Inputs alone over the budget are refused when the sweep is submitted.
    let (status, answer) = server.post(
        "/api/measure",
        &json!({"methods": ["linear"], "max_seq": 65536, "heads": 16, "dim": 64}).to_string(),
    );
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("budget"),
        "{answer}"
    );
}

/// Resident memory of process `pid`, in bytes (Linux).
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A float32 .npy of `[1, seq, heads, dim]`, values 0.01 · (index mod 97).
fn upload(seq: usize, heads: usize, dim: usize) -> Vec<u8> {
    let values: Vec<f32> = (0..seq * heads * dim)
        .map(|i| (i % 97) as f32 * 0.01)
        .collect();
    let scratch = Scratch::new(&format!("upload-{seq}-{heads}-{dim}"));
    std::fs::read(scratch.array("x.npy", &[1, seq, heads, dim], &values)).unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn uploads_are_shared_by_jobs_and_freed_when_deleted() {
    let scratch = Scratch::new("uploads-tmp");
    let server = Server::start_with(&[], Some(&scratch.0));
    // Three tensors of 32 MiB.
    let tensor = upload(65536, 2, 64);
    let before = resident(server.pid());
    for role in ["q", "k", "v"] {
        let (status, state) = server.put(&format!("/api/inputs/{role}"), tensor.clone());
        assert_eq!(status, 200, "{state}");
    }
    assert_eq!(
        std::fs::read_dir(&scratch.0).unwrap().count(),
        3,
        "one file each"
    );
    let uploaded = resident(server.pid());
    // Twelve small jobs on them: no copy each.
    let request = json!({"methods": ["linear"], "min_seq": 16, "max_seq": 16, "heads": 1, "dim": 1, "inputs": "uploaded"});
    let mut ids = Vec::new();
    for _ in 0..12 {
        let (status, job) = server.post("/api/measure", &request.to_string());
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_u64().unwrap());
    }
    for id in ids {
        assert_eq!(server.wait(id)["state"], "done");
    }
    let after_jobs = resident(server.pid());
    assert!(
        after_jobs < uploaded + (64 << 20),
        "12 jobs took the server from {uploaded} to {after_jobs} bytes"
    );
    let (_, listing) = server.get("/api/inputs");
    assert_eq!(listing["ready"], true);
    server.delete("/api/inputs");
    let freed = resident(server.pid());
    assert!(
        freed < uploaded - (64 << 20),
        "deleting the uploads freed nothing: {before} before, {uploaded} with them, {freed} after"
    );
    assert_eq!(
        std::fs::read_dir(&scratch.0).unwrap().count(),
        0,
        "their files are removed"
    );
}

#[test]
fn the_queue_is_bounded() {
    let server = Server::start_with(&["--case-seconds", "60"], None);
    let (_, info) = server.get("/api/info");
    let limit = info["max_queued"].as_u64().unwrap();
    let long = softmax_taking(&server, 3.0);
    let (_, running) = server.post("/api/measure", &long.to_string());
    wait_until_running(&server, running["id"].as_u64().unwrap());
    let quick = json!({"methods": ["linear"], "min_seq": 64, "max_seq": 64, "heads": 1, "dim": 8})
        .to_string();
    let mut queued = Vec::new();
    for _ in 0..limit {
        let (status, job) = server.post("/api/measure", &quick);
        assert_eq!(status, 202, "{job}");
        queued.push(job["id"].as_u64().unwrap());
    }
    let (status, answer) = server.post("/api/measure", &quick);
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("waiting"),
        "{answer}"
    );
    for id in queued {
        server.delete(&format!("/api/jobs/{id}"));
    }
    server.delete(&format!("/api/jobs/{}", running["id"]));
    let (status, _) = server.post("/api/measure", &quick);
    assert_eq!(status, 202, "room again once the queue drains");
}

#[test]
fn requests_from_other_sites_are_refused() {
    let server = Server::start();
    let host = server.address().to_string();
    let port = host.rsplit(':').next().unwrap().to_string();
    let get = |host: &str| server.raw(&format!("GET /api/info HTTP/1.1\r\nHost: {host}"), "");
    assert_eq!(get(&host).0, 200);
    assert_eq!(get(&format!("localhost:{port}")).0, 200);
    // DNS rebinding: a name of the attacker's that resolves to this machine.
    let (status, body) = get(&format!("rebind.example:{port}"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let body = r#"{"methods": ["linear"], "seq": 8, "dim": 4}"#;
    let post = |headers: &str| {
        server.raw(
            &format!("POST /api/maps HTTP/1.1\r\nHost: {host}\r\n{headers}"),
            body,
        )
    };
    // A form or a "simple" cross-site request cannot send JSON.
    let (status, answer) = post("Content-Type: text/plain");
    assert_eq!(status, 415, "{answer}");
    let (status, answer) = post("Content-Type: application/json\r\nOrigin: http://evil.example");
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = post(&format!(
        "Content-Type: application/json\r\nOrigin: http://{host}"
    ));
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn every_api_error_is_json_and_duplicates_are_refused_everywhere() {
    let server = Server::start();
    let (status, answer) = server.get("/api/jobs/abc");
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("job id"),
        "{answer}"
    );
    let (status, answer) = server.delete("/api/info");
    assert_eq!(status, 405);
    assert!(answer["error"].is_string(), "{answer}");
    let (status, answer) = server.post(
        "/api/maps",
        &json!({"methods": ["linear", "linear"], "seq": 8, "dim": 4}).to_string(),
    );
    assert_eq!(status, 422);
    assert!(
        answer["error"].as_str().unwrap().contains("twice"),
        "{answer}"
    );
    let (status, answer) = server.post(
        "/api/decode",
        &json!({"methods": ["linear", "linear"], "prompt_len": 8, "tokens": 2, "heads": 1, "dim": 4})
            .to_string(),
    );
    assert_eq!(status, 422);
    assert!(
        answer["error"].as_str().unwrap().contains("twice"),
        "{answer}"
    );
}
