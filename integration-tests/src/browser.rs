//! Headless Chromium driven through chromedriver's WebDriver API (Debian `chromium` and
//! `chromium-driver`, installed by `make deps`): one browser session per [`Browser`],
//! killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless window of `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let port = crate::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (make deps installs chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        crate::wait_until(Duration::from_secs(20), "chromedriver ready", || {
            let status: Value = ureq::get(&format!("{base}/status"))
                .call()
                .ok()?
                .into_json()
                .ok()?;
            status["value"]["ready"].as_bool()?.then_some(())
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new".to_owned(),
            // Root in a container: Chromium's sandbox needs user namespaces it may not get.
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let response: Value = ureq::post(&format!("{base}/session"))
            .send_json(json!({
                "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": chromium(), "args": args }
                }}
            }))
            .expect("a browser session starts")
            .into_json()
            .unwrap();
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {response}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            _profile: profile,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    pub fn open(&self, url: &str) {
        ureq::post(&self.url("/url"))
            .send_json(json!({ "url": url }))
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn eval(&self, script: &str) -> Value {
        let response: Value = ureq::post(&self.url("/execute/sync"))
            .send_json(json!({ "script": script, "args": [] }))
            .unwrap_or_else(|e| panic!("running a script: {e}"))
            .into_json()
            .unwrap();
        response["value"].clone()
    }

    /// Polls `script` until it returns `true`.
    pub async fn wait_for(&self, timeout: Duration, what: &str, script: &str) {
        let start = Instant::now();
        loop {
            if self.eval(script) == Value::Bool(true) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The window as a PNG.
    pub fn screenshot(&self) -> Vec<u8> {
        let response: Value = ureq::get(&self.url("/screenshot"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(response["value"].as_str().unwrap())
            .unwrap()
    }
}

/// The Chromium binary (`$CHROMIUM`, else Debian's).
fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
