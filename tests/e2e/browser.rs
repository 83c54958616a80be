//! A real headless browser for the end-to-end tests: Debian's chromium, driven over the Chrome
//! DevTools Protocol on `--remote-debugging-pipe` (file descriptors 3 and 4, messages ended by
//! NUL), so no WebSocket client and no driver binary are needed. Every address but loopback is
//! unreachable for it (a dead proxy and a resolver that resolves nothing), and its background
//! services are off: a test's browser sends no traffic off the machine.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Chrome {
    child: Child,
    to: std::fs::File,
    from: BufReader<std::fs::File>,
    next: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Chrome {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chromium binary: `$CHROMIUM`, else `chromium` on the PATH.
fn binary() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

impl Chrome {
    /// Starts headless chromium with one blank page attached.
    pub fn start() -> Chrome {
        let profile = tempfile::tempdir().unwrap();
        let (cmd_r, cmd_w) = std::io::pipe().unwrap();
        let (out_r, out_w) = std::io::pipe().unwrap();
        let (cmd_r, out_w): (OwnedFd, OwnedFd) = (cmd_r.into(), out_w.into());
        let (fd_in, fd_out) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut cmd = Command::new(binary());
        cmd.args([
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,CertificateTransparencyComponentUpdater",
            "--metrics-recording-only",
            // Loopback only: anything else goes to a dead proxy, and no name resolves.
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--window-size=1400,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. Each end is
        // first copied above 10, so that neither dup2 lands on the other's descriptor nor is a
        // no-op that would leave close-on-exec set (pipe ends can be 3 or 4 themselves).
        unsafe {
            cmd.pre_exec(move || {
                let (a, b) = (libc::fcntl(fd_in, libc::F_DUPFD_CLOEXEC, 10), libc::fcntl(fd_out, libc::F_DUPFD_CLOEXEC, 10));
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{}` ({e}): scripts/setup.sh installs Debian's chromium for the browser tests", binary()));
        drop((cmd_r, out_w));
        let mut c = Chrome {
            child,
            to: std::fs::File::from(OwnedFd::from(cmd_w)),
            from: BufReader::new(std::fs::File::from(OwnedFd::from(out_r))),
            next: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = c.call_on(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().expect("a target id").to_string();
        let attached = c.call_on(None, "Target.attachToTarget", json!({ "targetId": target, "flatten": true }));
        c.session = attached["sessionId"].as_str().expect("a session id").to_string();
        c.call("Page.enable", json!({}));
        c.call("Runtime.enable", json!({}));
        c
    }

    fn call_on(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        self.to.flush().unwrap();
        loop {
            let mut buf = Vec::new();
            let n = self.from.read_until(0, &mut buf).unwrap();
            assert!(n > 0, "chromium closed the DevTools pipe during {method}");
            buf.pop();
            let v: Value = serde_json::from_slice(&buf).unwrap();
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// A DevTools command on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.call_on(Some(&s), method, params)
    }

    /// The value of a JavaScript expression on the page (promises awaited).
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }));
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits up to `secs` for `expr` to be true; panics with `what` and the page's status line.
    pub fn wait_for(&mut self, expr: &str, secs: u64, what: &str) {
        let t = Instant::now();
        while self.eval(expr) != json!(true) {
            if t.elapsed() > Duration::from_secs(secs) {
                let status = self.eval("document.getElementById('status') ? document.getElementById('status').textContent : ''");
                panic!("waited {secs}s for {what} ({expr}); the page says: {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_for("document.readyState === 'complete'", 30, "the page to load");
    }

    /// One key pressed and released, as a keyboard would (`key` as in KeyboardEvent.key).
    pub fn press(&mut self, key: &str) {
        self.press_with(key, false);
    }

    /// [`Self::press`], with Shift held when `shift`.
    pub fn press_with(&mut self, key: &str, shift: bool) {
        let (code, vk, text) = match key {
            "Enter" => ("Enter".to_string(), 13, "\r".to_string()),
            "Escape" => ("Escape".to_string(), 27, String::new()),
            "Tab" => ("Tab".to_string(), 9, String::new()),
            "ArrowLeft" => (key.to_string(), 37, String::new()),
            "ArrowUp" => (key.to_string(), 38, String::new()),
            "ArrowRight" => (key.to_string(), 39, String::new()),
            "ArrowDown" => (key.to_string(), 40, String::new()),
            k if k.len() == 1 && k.as_bytes()[0].is_ascii_digit() => (format!("Digit{k}"), k.as_bytes()[0] as i64, k.to_string()),
            k if k.len() == 1 && k.as_bytes()[0].is_ascii_lowercase() => {
                (format!("Key{}", k.to_ascii_uppercase()), k.to_ascii_uppercase().as_bytes()[0] as i64, k.to_string())
            }
            k => panic!("no key `{k}` in this driver"),
        };
        let modifiers = if shift { 8 } else { 0 };
        let mut down = json!({ "type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk, "modifiers": modifiers });
        if !text.is_empty() {
            down["text"] = json!(text);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call("Input.dispatchKeyEvent", json!({ "type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk, "modifiers": modifiers }));
    }

    /// Text typed into the focused field.
    pub fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({ "text": text }));
    }

    /// A PNG of the page as it is shown.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap()
    }
}
