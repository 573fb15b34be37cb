//! Azurite, Microsoft's Azure Storage emulator, for tests that keep blobs in a real Azure Blob
//! endpoint on loopback: installed into build/node (fakehost/scripts/install-azurite.sh; a
//! machine without node or npm fails the test, never skips it), started on a free port with
//! its data in a directory of the test's, and killed when the guard drops. Shared by
//! fakehost's store tests and the device tests in tests/ (included there by path), so it
//! needs nothing but std and the three crates both list for it.

#![allow(dead_code)] // each including test uses its own part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Azurite's well-known development account and key.
pub const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const DEADLINE: Duration = Duration::from_secs(60);

/// A running Azurite blob service; killed and reaped on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Azurite {
    /// Installs (if needed) and starts Azurite with its data under `dir`, and waits until its
    /// blob port accepts connections.
    pub fn start(dir: &Path) -> Azurite {
        let bin = install();
        let port = free_port();
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(port.to_string())
            .arg("--location")
            .arg(dir)
            .arg("--silent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let azurite = Azurite { child, port };
        let end = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "Azurite's blob port {port} never opened"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        azurite
    }

    /// Creates a container (Put Container); panics unless Azurite says 201.
    pub fn create_container(&self, container: &str) {
        let (code, body) = self.request(
            "PUT",
            &format!("/{ACCOUNT}/{container}"),
            &[("restype", "container")],
        );
        assert_eq!(code, 201, "create container: {}", text(&body));
    }

    /// `fakehost serve --blob-store` URL of `container`.
    pub fn store_url(&self, container: &str) -> String {
        format!(
            "azure://{ACCOUNT}/{container}?endpoint=http://127.0.0.1:{}/{ACCOUNT}",
            self.port
        )
    }

    /// One Shared Key-signed request (path-style: /ACCOUNT/CONTAINER[/BLOB]), with
    /// `Connection: close`; returns the status code and the body.
    pub fn request(&self, method: &str, path: &str, query: &[(&str, &str)]) -> (u16, Vec<u8>) {
        use base64::Engine;
        let port = self.port;
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let version = "2021-08-06";
        let mut resource = format!("/{ACCOUNT}{path}");
        for (k, v) in query {
            resource.push_str(&format!("\n{k}:{v}"));
        }
        // VERB, 11 standard headers (all empty here), the x-ms- headers, the resource.
        let to_sign = format!(
            "{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}"
        );
        let key =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &b64.decode(KEY).unwrap());
        let signature = b64.encode(aws_lc_rs::hmac::sign(&key, to_sign.as_bytes()).as_ref());
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let target = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", query.join("&"))
        };
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            stream,
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\n\
             x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = text(&response[..split]);
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (code, response[split + 4..].to_vec())
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The workspace root: both including crates sit one level below it.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Installs Azurite into build/node if it is not there; fails the test without node or npm.
fn install() -> PathBuf {
    for tool in ["node", "npm"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the Azurite test needs {tool}: install Node.js and npm (apt-get install nodejs npm, \
             or `make deps`)"
        );
    }
    let script = repo_root().join("fakehost/scripts/install-azurite.sh");
    let out = Command::new(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    repo_root().join("build/node/node_modules/.bin/azurite-blob")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
