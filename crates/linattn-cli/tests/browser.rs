//! The explorer end to end, as a user meets it: headless Chromium opens the page, sets a
//! small problem, moves the sequence-length slider with the keyboard, and the charts and
//! the table fill with measured values, then grow when the slider moves again.
//!
//! Chromium and chromedriver come from the distribution's packages; when they are
//! missing this test installs them with apt-get (it needs root, as CI has).

mod common;

use common::Server;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn ensure_chromium() {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|status| status.success())
    };
    let install = [
        "install",
        "-y",
        "--no-install-recommends",
        "chromium",
        "chromium-driver",
    ];
    // A fresh machine may have no package lists yet.
    let installed = apt(&install) || (apt(&["update"]) && apt(&install));
    assert!(
        installed && Path::new(CHROMEDRIVER).exists(),
        "the browser test needs Debian's chromium and chromium-driver packages, and \
         `apt-get install chromium chromium-driver` failed (run it as root)"
    );
}

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a browser session")
}

/// Waits until `check` holds, or fails with what the page shows.
async fn wait_for(client: &Client, what: &str, check: &str) {
    let start = Instant::now();
    loop {
        let done = client.execute(check, vec![]).await.expect("script runs");
        if done.as_bool() == Some(true) {
            return;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let status = client
                .find(Locator::Id("status"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            panic!("timed out waiting for {what}; status: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the button with id `button`, then waits until `check` holds.
async fn click_and_wait(client: &Client, button: &str, what: &str, check: &str) {
    client
        .find(Locator::Id(button))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(client, what, check).await;
}

/// The sequence lengths in the results table, and whether each row has a time.
async fn table(client: &Client) -> Vec<(u64, bool)> {
    let rows = client
        .execute(
            "return [...document.querySelectorAll('#results tbody tr')].map(r => \
             [Number(r.cells[1].textContent), !isNaN(parseFloat(r.cells[2].textContent))]);",
            vec![],
        )
        .await
        .unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| (row[0].as_u64().unwrap(), row[1].as_bool().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_the_slider_measures_and_the_charts_follow() {
    ensure_chromium();
    let server = Server::start();
    let driver = Driver::start();
    let client = browser(&driver).await;
    client.goto(&format!("{}/", server.url)).await.unwrap();
    wait_for(
        &client,
        "the method list",
        "return !!document.getElementById('method-linear');",
    )
    .await;

    // A small problem: two methods, one head of 16 dims.
    for (id, on) in [
        ("softmax", true),
        ("linear", true),
        ("performer", false),
        ("window", false),
    ] {
        let checkbox = client
            .find(Locator::Id(&format!("method-{id}")))
            .await
            .unwrap();
        if checkbox.is_selected().await.unwrap() != on {
            checkbox.click().await.unwrap();
        }
    }
    let heads = client.find(Locator::Id("heads")).await.unwrap();
    heads.clear().await.unwrap();
    heads.send_keys("1").await.unwrap();
    client
        .find(Locator::Id("dim"))
        .await
        .unwrap()
        .select_by_value("32")
        .await
        .unwrap();

    // The slider starts at 16k; four steps left with the keyboard: 1k.
    let slider = client.find(Locator::Id("seq")).await.unwrap();
    slider.click().await.unwrap();
    for _ in 0..4 {
        slider
            .send_keys(&String::from(char::from(Key::Left)))
            .await
            .unwrap();
    }
    wait_for(
        &client,
        "the first sweep",
        "return document.getElementById('status').textContent.startsWith('done') \
         && !document.getElementById('measure').disabled;",
    )
    .await;
    let shown = client
        .find(Locator::Id("seq-value"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(shown, "1k");
    let first = table(&client).await;
    assert!(
        !first.is_empty() && first.iter().all(|&(_, timed)| timed),
        "{first:?}"
    );
    let longest = first.iter().map(|&(seq, _)| seq).max().unwrap();
    assert!(
        longest >= 1024,
        "measured up to the slider at least once: {first:?}"
    );
    let points = |client: &Client| {
        let client = client.clone();
        async move {
            let value = client
                .execute(
                    "return Number(document.getElementById('chart-time').dataset.points);",
                    vec![],
                )
                .await
                .unwrap();
            value.as_u64().unwrap()
        }
    };
    let before = points(&client).await;
    assert!(
        before >= 4,
        "the time chart holds the measured points: {before}"
    );
    let canvases = client
        .find_all(Locator::Css("#chart-time canvas"))
        .await
        .unwrap();
    assert!(!canvases.is_empty(), "uPlot drew the chart");

    // One step right: 2k is measured too and the chart grows.
    let slider = client.find(Locator::Id("seq")).await.unwrap();
    slider
        .send_keys(&String::from(char::from(Key::Right)))
        .await
        .unwrap();
    wait_for(
        &client,
        "the second sweep",
        "return [...document.querySelectorAll('#results tbody tr')].some(r => r.cells[1].textContent === '2048') \
         && document.getElementById('status').textContent.startsWith('done');",
    )
    .await;
    let after = points(&client).await;
    assert!(
        after > before,
        "the chart grew with the new length: {before} -> {after}"
    );
    assert!(table(&client).await.iter().all(|&(_, timed)| timed));
    // The decoding panel and the attention maps, with their own buttons.
    for (id, value) in [
        ("prompt-len", "64"),
        ("decode-tokens", "16"),
        ("map-seq", "24"),
    ] {
        let field = client.find(Locator::Id(id)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }
    click_and_wait(
        &client,
        "run-decode",
        "the decoding charts",
        "return Number(document.getElementById('chart-step').dataset.points) > 0 \
         && document.getElementById('decode-status').textContent.includes('µs/token');",
    )
    .await;
    click_and_wait(
        &client,
        "draw-maps",
        "the attention maps",
        "return document.querySelectorAll('#map-grid canvas').length === 3;",
    )
    .await;
    // What the user saw, for whoever reads a failure or looks at the page's state.
    let screenshot = client.screenshot().await.unwrap();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("explore.png");
    std::fs::write(&path, screenshot).unwrap();
    client.close().await.unwrap();
}
