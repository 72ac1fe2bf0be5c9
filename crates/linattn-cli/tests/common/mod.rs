//! Helpers shared by the tests of `linattn explore`.
#![allow(dead_code)] // each test binary uses its own part

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `linattn explore`, stopped when dropped.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    pub fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_linattn"))
            .args(["explore", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("linattn starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the server prints its address");
        let url = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .trim_end_matches('/')
            .to_string();
        Self { child, url }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        json_answer(Self::agent().get(self.url(path)).call())
    }

    pub fn text(&self, path: &str) -> (u16, String) {
        let mut response = Self::agent().get(self.url(path)).call().unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        json_answer(
            Self::agent()
                .post(self.url(path))
                .header("content-type", "application/json")
                .send(body),
        )
    }

    pub fn put(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        json_answer(Self::agent().put(self.url(path)).send(&body[..]))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        json_answer(Self::agent().delete(self.url(path)).call())
    }

    /// Polls a job until it ends.
    pub fn wait(&self, id: u64) -> Value {
        let start = Instant::now();
        loop {
            let (status, job) = self.get(&format!("/api/jobs/{id}"));
            assert_eq!(status, 200, "{job}");
            if job["state"] == "done" || job["state"] == "cancelled" {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "job {id} never ended: {job}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The status and JSON body of an answer (`null` when the body is not JSON).
fn json_answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut response = response.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
