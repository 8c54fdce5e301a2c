//! A server in a child process: the test binary runs itself again as one of its own tests,
//! which serves when an environment variable tells it what to serve and prints the address it
//! listens on ([`announce`]); the parent reads that address, talks to it over TCP, and kills the
//! child when done with it (or when dropped).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};

/// The line a child prints once it listens, followed by its address.
const LISTENING: &str = "child listening on ";

/// Called in the child: tells the parent where it listens.
pub fn announce(addr: SocketAddr) {
    println!("{LISTENING}{addr}");
}

/// A child server process, killed when dropped.
pub struct ChildServer {
    process: Child,
    stdout: BufReader<ChildStdout>,
    pub addr: SocketAddr,
}

impl ChildServer {
    /// Runs this test binary's test `test` (alone, its output not captured) with `var` set to
    /// `value`, and waits until it [announces](announce) its address. Its standard error is
    /// this process's, so that its panics show in the test's output.
    pub fn start(test: &str, var: &str, value: impl AsRef<OsStr>) -> Self {
        Self::spawn(test, var, value, Stdio::inherit())
    }

    /// As [`start`](Self::start), its standard error discarded: for children that crash or
    /// panic on purpose.
    pub fn start_quiet(test: &str, var: &str, value: impl AsRef<OsStr>) -> Self {
        Self::spawn(test, var, value, Stdio::null())
    }

    fn spawn(test: &str, var: &str, value: impl AsRef<OsStr>, stderr: Stdio) -> Self {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(var, value)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = BufReader::new(process.stdout.take().unwrap());
        let mut child = Self {
            process,
            stdout,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        child.addr = child.read_after(LISTENING).parse().unwrap();
        child
    }

    /// Reads the child's output up to a line that holds `marker`, and returns what follows the
    /// marker on it, trimmed. (The test harness may print its own words before the child's on
    /// the line.) Panics, with the child's exit status, if its output ends first.
    pub fn read_after(&mut self, marker: &str) -> String {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).unwrap() == 0 {
                let _ = self.process.kill();
                let status = self.process.wait();
                panic!("the child server's output ended before {marker:?}: {status:?}");
            }
            if let Some((_, rest)) = line.split_once(marker) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Sends the child `SIGTERM` (its cue to shut down gracefully).
    pub fn terminate(&self) {
        let pid = self.process.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success(), "kill -TERM {pid}");
    }

    /// Waits for the child to end by itself.
    pub fn wait(&mut self) -> ExitStatus {
        self.process.wait().unwrap()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
