//! The container's runtime contract without a container runtime (none runs on these machines): the real `herald`
//! binary as a non-root user (65532, distroless's `nonroot`) in a private mount namespace whose root filesystem is
//! read-only, with only a tmpfs data directory writable. A registry member must elect itself and answer
//! `/readyz` (it wrote its vote and log), `herald dev` must serve (its embedded registry lives under `$TMPDIR`),
//! and `herald ctl round-trip` (the chart's `helm test` pod) must pass against it, confined the same way. Needs
//! root for the namespace and the uid switch; without it the test says so and does nothing.
//!
//! The shared libraries the binary needs are checked too: only what the runtime image (distroless/cc, Debian 12:
//! glibc 2.36 and libgcc_s) provides, as the Dockerfile says.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::procs::{free_port, HERALD};
use support::*;

const UID: u32 = 65532;

/// Whether this process can make a mount namespace and switch users (root, with `unshare` and `setpriv`).
fn can_confine() -> bool {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("setpriv")
            .args([
                "--reuid",
                &UID.to_string(),
                "--regid",
                &UID.to_string(),
                "--clear-groups",
                "true",
            ])
            .status()
            .is_ok_and(|s| s.success())
}

/// The libraries the image provides: glibc's (libc, libm, the loader: x86-64's or arm64's) and libgcc_s, and the
/// kernel's vDSO.
const IMAGE_LIBRARIES: [&str; 6] = [
    "linux-vdso.so.1",
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
];
/// The runtime image's glibc (Debian 12): the binary may use no newer symbol version.
const IMAGE_GLIBC: (u32, u32) = (2, 36);

#[test]
fn the_binary_needs_only_the_libraries_the_runtime_image_has() {
    let Ok(output) = Command::new("ldd").arg(HERALD).output() else {
        eprintln!("SKIPPED: no ldd(1) to list the binary's shared libraries");
        return;
    };
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "ldd failed: {listing}");
    for line in listing.lines() {
        let library = line.split_whitespace().next().unwrap_or_default();
        let name = library.rsplit('/').next().unwrap_or_default();
        assert!(
            IMAGE_LIBRARIES.contains(&name),
            "the binary needs {name}, which the runtime image does not have (see Dockerfile): {listing}"
        );
    }
    // The newest glibc symbol version it links against, from its dynamic symbol table.
    let Ok(symbols) = Command::new("objdump").args(["-T", HERALD]).output() else {
        eprintln!("SKIPPED (glibc version part): no objdump(1)");
        return;
    };
    let newest = String::from_utf8_lossy(&symbols.stdout)
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let version: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            Some((parts.next()?, parts.next().unwrap_or(0)))
        })
        .max()
        .expect("the binary links glibc");
    assert!(
        newest <= IMAGE_GLIBC,
        "the binary needs glibc {newest:?}, the runtime image has {IMAGE_GLIBC:?}"
    );
}

/// Runs `herald args...` confined: `/` read-only, `writable` a tmpfs owned by the non-root user.
fn confined(writable: &std::path::Path, env: &[(&str, String)], args: &[String]) -> Child {
    let script = format!(
        "mount --bind / / && mount -o remount,bind,ro / && \
         mount -t tmpfs -o uid={UID},gid={UID},mode=0700 tmpfs '{dir}' && \
         exec setpriv --reuid={UID} --regid={UID} --clear-groups '{HERALD}' \"$@\"",
        dir = writable.display()
    );
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "herald",
        ])
        .args(args)
        .env("HERALD_ADMIN_PORT", "0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start confined herald")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on `addr` answered 200 (false while nothing listens yet).
async fn answers_ok(addr: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut response)).await;
    response.starts_with(b"HTTP/1.1 200")
}

async fn wait_ready(addr: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("confined herald exited with {status}");
        }
        if answers_ok(addr, "/readyz").await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}/readyz never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The uid a process runs as (from /proc), and whether, in its mount namespace and as that user, the root
/// filesystem refuses a write while `writable` takes one.
fn confinement_of(pid: u32, writable: &std::path::Path) -> (u32, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let write = |path: String| {
        Command::new("nsenter")
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--root",
                "--wd",
                "setpriv",
            ])
            .args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
            ])
            .args(["sh", "-c", &format!("echo probe > '{path}'")])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let probe = format!("herald-ro-probe-{}", std::process::id());
    let root_refuses = !write(format!("/{probe}")) && !write(format!("/tmp/{probe}"));
    let data_takes = write(writable.join(&probe).display().to_string());
    (uid, root_refuses && data_takes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_runs_as_non_root_on_a_read_only_root_with_only_its_data_dir_writable() {
    if !can_confine() {
        eprintln!(
            "SKIPPED: needs root with unshare(1) and setpriv(1) to make a read-only mount namespace and switch to uid {UID}"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("herald-ro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = support::procs::Dir(dir.clone());

    // A registry member: its vote and log go to --data-dir, the only writable place.
    let (port, metrics) = (free_port(), free_port());
    let mut registry = Killed(confined(
        &dir,
        &[],
        &[
            "registry".into(),
            "--node-id".into(),
            "0".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            dir.join("raft").display().to_string(),
            "--cluster-secret".into(),
            "runtime-test-secret-0123456789".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics}"),
        ],
    ));
    wait_ready(&format!("127.0.0.1:{metrics}"), &mut registry.0).await;
    let (uid, only_data_writable) = confinement_of(registry.0.id(), &dir);
    assert_eq!(uid, UID, "runs as the non-root user");
    assert!(only_data_writable, "only the data directory is writable");
    drop(registry);

    // `herald dev`: the embedded registry's data under $TMPDIR.
    let http = free_port();
    let mut dev = Killed(confined(
        &dir,
        &[("TMPDIR", dir.display().to_string())],
        &[
            "dev".into(),
            "--port".into(),
            http.to_string(),
            "--grpc-port".into(),
            "0".into(),
        ],
    ));
    wait_ready(&format!("127.0.0.1:{http}"), &mut dev.0).await;
    assert_eq!(confinement_of(dev.0.id(), &dir), (UID, true));
    let mut client = WsClient::connect(&format!("ws://127.0.0.1:{http}/ws/"), &[]).await;
    assert_eq!(client.recv_json().await["is_authorized"], true);

    // The `helm test` pod: `herald ctl round-trip`, confined the same way, writes nothing at all.
    let mut round_trip = confined(
        &dir,
        &[],
        &[
            "ctl".into(),
            "round-trip".into(),
            "--edge".into(),
            format!("127.0.0.1:{http}"),
            "--timeout-secs".into(),
            "20".into(),
        ],
    );
    let status = tokio::task::spawn_blocking(move || round_trip.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "confined herald ctl round-trip: {status}");
}
