//! Real `herald` child processes for the multi-process tests (cluster, ctl): started from the binary cargo built
//! for these tests, killed by their own PID when dropped, with free loopback ports and temporary data directories.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// A child process killed by its own PID when the test ends.
pub struct Proc {
    child: Child,
    first_line: String,
}

impl Proc {
    /// Starts `herald` and waits for its first stdout line, the `herald listening: ...` line every role prints
    /// once its listeners are bound.
    pub fn spawn(args: &[String]) -> Proc {
        Proc::spawn_with(args, &[], None)
    }

    /// [`Proc::spawn`] with extra environment variables (after the defaults, so they can override
    /// `RUST_LOG`), and stderr (the logs) written to `stderr` instead of discarded.
    pub fn spawn_with(
        args: &[String],
        env: &[(&str, String)],
        stderr: Option<&std::path::Path>,
    ) -> Proc {
        let stderr = match stderr {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
            None => Stdio::null(),
        };
        let mut child = Command::new(HERALD)
            .args(args)
            .env("RUST_LOG", "warn")
            // Several nodes share this machine: each takes a free admin port (printed as `admin=`).
            .env("HERALD_ADMIN_PORT", "0")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start herald");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first_line = String::new();
        stdout.read_line(&mut first_line).unwrap();
        assert!(first_line.contains("listening"), "{first_line:?}");
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stdout.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Proc { child, first_line }
    }

    /// A `name=value` field of the listening line, e.g. `http`.
    pub fn field(&self, name: &str) -> String {
        self.first_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {:?}", self.first_line))
            .to_owned()
    }
}

impl Proc {
    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait on herald")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free right now (another process could take it before use; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temporary directory removed on drop (the tests crate has no tempfile dependency).
pub struct Dir(pub std::path::PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let path = std::env::temp_dir().join(format!(
            "herald-test-{}-{tag}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
