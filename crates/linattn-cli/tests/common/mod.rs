//! Helpers shared by the tests of `linattn explore`.
#![allow(dead_code)] // each test binary uses its own part

use linattn::{Element, Tensor};
use npyz::WriterBuilder;
use serde_json::Value;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `linattn explore`, stopped when dropped.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(&[], None)
    }

    /// A server with more arguments, and its temporary files (uploads) in `tmpdir`.
    pub fn start_with(args: &[&str], tmpdir: Option<&std::path::Path>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_linattn"));
        command.args(["explore", "--port", "0"]).args(args);
        if let Some(dir) = tmpdir {
            command.env("TMPDIR", dir);
        }
        let mut child = command
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

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port` of the server.
    pub fn address(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Sends a request as written: `head` is its request line and headers (no final line
    /// break), `body` its body. Returns the status and the body of the answer.
    pub fn raw(&self, head: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.address()).unwrap();
        write!(
            stream,
            "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
            .to_string();
        (status, body)
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

/// A directory of its own for one test's files, removed afterwards.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("linattn-cli-{}-{test}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `tensor` with npyz as `name` and returns its path.
    pub fn tensor<T: Element + npyz::AutoSerialize>(
        &self,
        name: &str,
        tensor: &Tensor<T>,
    ) -> PathBuf {
        self.array(name, &tensor.shape(), tensor.as_slice())
    }

    /// Writes a C-order array with npyz as `name` and returns its path.
    pub fn array<T: npyz::AutoSerialize + Copy>(
        &self,
        name: &str,
        shape: &[usize],
        data: &[T],
    ) -> PathBuf {
        let path = self.path(name);
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape)
            .writer(File::create(&path).unwrap())
            .begin_nd()
            .unwrap();
        writer.extend(data.iter().copied()).unwrap();
        writer.finish().unwrap();
        path
    }

    /// Writes raw bytes as `name`, for files npyz would not write.
    pub fn bytes(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover temp directory is not worth failing a test over.
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn linattn<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_linattn"))
        .args(args)
        .output()
        .unwrap()
}
