//! `cargo xtask fuzz`: the cargo-fuzz (libFuzzer) targets in `userspace/fuzz/`, each for a
//! while. Corpora live in `userspace/fuzz/corpus/<target>/` (committed); crashes land in
//! `userspace/fuzz/artifacts/<target>/` (ignored by git), and each one found becomes a unit
//! test next to the code it broke.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{have, run, toolchain_cargo, workspace_root};
use crate::{build, say};

/// cargo-fuzz needs a nightly (sanitizers, `-Z` flags): the one the eBPF build installs.
use crate::bootstrap::EBPF_TOOLCHAIN as FUZZ_TOOLCHAIN;

/// The targets, as `userspace/fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &[
    "datapath",
    "switch_classify",
    "vhost_shim",
    "config",
    "control_request",
    "offload",
];

fn fuzz_dir() -> PathBuf {
    workspace_root().join("userspace/fuzz")
}

/// Installs cargo-fuzz if it is missing (`cargo install cargo-fuzz --locked`, from crates.io).
fn ensure_cargo_fuzz() -> Result<()> {
    if have("cargo-fuzz") {
        return Ok(());
    }
    say!("installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz")
}

/// A `cargo fuzz` command on the nightly, for the fuzz crate, with the XDP object the library
/// embeds.
fn cargo_fuzz(object: &Path) -> Command {
    let mut c = toolchain_cargo(FUZZ_TOOLCHAIN);
    c.current_dir(workspace_root())
        .arg("fuzz")
        .env("XVDPA_EBPF_OBJECT", object);
    c
}

/// The value of libFuzzer's `stat::<name>: N` final-stats line.
fn stat(stderr: &str, name: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("stat::{name}:")))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

fn check_targets(targets: &[&str]) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(t) {
            bail!(
                "no fuzz target {t:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    Ok(())
}

/// Builds the targets, then runs each of `targets` for `seconds`. With `grow_corpus` new
/// inputs are added to the committed corpus (`cargo xtask fuzz`); without, they go to a
/// scratch directory and the corpus is only read (`cargo xtask test`). Fails on the first
/// crash, timeout or leak, naming the saved input.
pub fn fuzz_targets(targets: &[&str], seconds: u64, grow_corpus: bool) -> Result<()> {
    check_targets(targets)?;
    ensure_cargo_fuzz()?;
    let object = build::build_ebpf()?;
    say!("building the fuzz targets (cargo +{FUZZ_TOOLCHAIN} fuzz build, with AddressSanitizer)");
    run(cargo_fuzz(&object)
        .args(["build", "--fuzz-dir"])
        .arg(fuzz_dir()))
    .context("building the fuzz targets")?;
    run_built_targets(targets, seconds, grow_corpus, &object)
}

/// The fuzz targets' build, running at the kernel's idle priority (`SCHED_IDLE`) while
/// something else has the CPUs: `cargo xtask test` starts it before the test binaries run,
/// which leave a CPU idle most of the time (a TCG guest's one vCPU, waits on the network),
/// and fuzzes once both are done.
pub struct BackgroundBuild {
    child: Option<Child>,
    log: PathBuf,
    object: PathBuf,
}

impl BackgroundBuild {
    pub fn start() -> Result<Self> {
        ensure_cargo_fuzz()?;
        let object = build::build_ebpf()?;
        let dir = fuzz_dir();
        let log = dir.join("target/background-build.log");
        std::fs::create_dir_all(log.parent().unwrap_or(&dir))?;
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        say!(
            "building the fuzz targets in the background at idle priority (cargo +{FUZZ_TOOLCHAIN} \
             fuzz build, with AddressSanitizer; output in {})",
            log.display()
        );
        let mut cmd = cargo_fuzz(&object);
        cmd.args(["build", "--fuzz-dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        idle_priority(&mut cmd);
        // Its own process group, so that a suite that fails stops the compilers it started too.
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(BackgroundBuild {
            child: Some(child),
            log,
            object,
        })
    }

    /// Waits for the build, then runs each target as [`fuzz_targets`] does.
    pub fn run_targets(mut self, targets: &[&str], seconds: u64) -> Result<()> {
        check_targets(targets)?;
        let status = match self.child.take() {
            Some(mut child) => child.wait()?,
            None => bail!("the fuzz targets' build was not started"),
        };
        if !status.success() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
            bail!(
                "building the fuzz targets failed ({status}); its output is in {}",
                self.log.display()
            );
        }
        run_built_targets(targets, seconds, false, &self.object)
    }
}

impl Drop for BackgroundBuild {
    /// A suite that failed before fuzzing leaves no compiler running behind it.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(group) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) with a negative pid signals the process group the child
                // leads (made with `process_group(0)`); it touches no memory of ours.
                unsafe { libc::kill(-group, libc::SIGKILL) };
            }
            let _ = child.wait();
        }
    }
}

/// Runs the command's process, and every process it starts, under `SCHED_IDLE`: it gets a
/// CPU only when nothing else wants it.
fn idle_priority(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and makes one syscall,
    // sched_setscheduler, which is async-signal-safe; `param` lives on the child's stack.
    unsafe {
        cmd.pre_exec(|| {
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs each of `targets`, already built, for `seconds`.
fn run_built_targets(
    targets: &[&str],
    seconds: u64,
    grow_corpus: bool,
    object: &Path,
) -> Result<()> {
    let dir = fuzz_dir();
    for &target in targets {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(dir.join("artifacts").join(target))?;
        let mut cmd = cargo_fuzz(object);
        cmd.args(["run", "--fuzz-dir"]).arg(&dir).arg(target);
        if !grow_corpus {
            // libFuzzer writes new inputs to the first directory and only reads the others.
            let scratch = dir.join("target/scratch-corpus").join(target);
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir_all(&scratch)?;
            cmd.arg(&scratch);
        }
        cmd.arg(&corpus).args([
            "--",
            &format!("-max_total_time={seconds}"),
            // A hang is a bug too: no single input may take seconds.
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ]);
        say!("fuzzing {target} for {seconds} s");
        let started = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
            bail!(
                "fuzz target {target} failed ({}): the input is saved under {}; make it a unit \
                 test next to the code, fix, run again",
                out.status,
                dir.join("artifacts").join(target).display()
            );
        }
        say!(
            "{target}: {} runs, {} exec/s, clean ({:.0} s with start-up)",
            stat(&stderr, "number_of_executed_units"),
            stat(&stderr, "average_exec_per_sec"),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `cargo xtask fuzz [--seconds N] [--target NAME]`.
pub fn fuzz(seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) => vec![t],
        None => TARGETS.to_vec(),
    };
    fuzz_targets(&targets, seconds, true)?;
    say!(
        "all fuzz targets ran clean; new corpus entries (if any) are in {}",
        fuzz_dir().join("corpus").display()
    );
    Ok(())
}
