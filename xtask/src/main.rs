//! `cargo xtask`: build, run, lab, vm, dist, test, bench, fuzz, soak. See README.md.

mod bench_cmd;
mod bootstrap;
mod build;
mod dist_cmd;
mod fuzz_cmd;
mod guest_image;
mod lab_cmd;
mod run_cmd;
mod soak_cmd;
mod test_cmd;
mod util;
mod vm_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test xvdpa")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Installs what is missing (apt packages, rust-src, bpf-linker), builds the XDP program
    /// and the daemon that embeds it: target/{debug,release}/xvdpa.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Builds and starts the daemon. Without arguments: on the built-in lab (a namespace and a
    /// veth pair), printing the QEMU command line that attaches a VM. Arguments after `--` go
    /// to the daemon instead (e.g. `-- --iface eth0 --socket /run/xvdpa/vm0.sock --mac ...`).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        daemon_args: Vec<String>,
    },
    /// Creates or removes the lab: namespace `<name>-host` with nic0 (10.77.0.254) and
    /// `<name>-wire` with wire0 (10.77.0.1), joined by a veth pair.
    Lab {
        #[arg(value_enum)]
        action: lab_cmd::LabAction,
        #[arg(long, default_value = lab_cmd::DEFAULT_LAB)]
        name: String,
    },
    /// Boots the test guest under QEMU attached to the daemon (starting the lab and a daemon if
    /// none serves the socket). Interactive console, or `--cmd` runs a command and prints it.
    Vm {
        /// Shell command to run in the guest; its output is printed and its exit code returned.
        #[arg(long)]
        cmd: Option<String>,
        /// The guest's address on the lab subnet.
        #[arg(long, default_value = "10.77.0.2/24")]
        ip: String,
        #[arg(last = true)]
        daemon_args: Vec<String>,
    },
    /// Benchmarks xvdpa against DPDK testpmd (vhost + AF_XDP PMDs) and the bare AF_XDP
    /// ceiling, with a kernel-side traffic generator; prints a table (needs root).
    Bench(bench_cmd::BenchArgs),
    /// Runs the cargo-fuzz targets (userspace/fuzz/), each for `--seconds`, installing
    /// cargo-fuzz if missing; new inputs join the committed corpus, crashes are saved under
    /// userspace/fuzz/artifacts/.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (datapath, switch_classify, vhost_shim, config, control_request).
        #[arg(long)]
        target: Option<String>,
    },
    /// Lifecycle soak (needs root): on one port, `--cycles` frontend connect / traffic /
    /// device reset / traffic / disconnect cycles while another port streams; prints the
    /// daemon's open fds, threads and resident memory before and after, and fails unless
    /// they came back. Soaks the daemon in `XVDPA_BIN` if set, else builds one.
    Soak {
        #[arg(long, default_value_t = 1000)]
        cycles: usize,
        #[arg(long)]
        release: bool,
    },
    /// Builds the Debian package target/dist/xvdpa_<version>_<arch>.deb: the release daemon,
    /// its systemd unit and example /etc/xvdpa.toml (userspace/dist/), the man page and
    /// bash/zsh/fish completions.
    Dist,
    /// The whole suite: unit, integration and QEMU end-to-end tests (needs root).
    Test {
        /// Arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build { release } => {
            build::build(release).map(|bin| say!("daemon built: {}", bin.display()))
        }
        Cmd::Run {
            release,
            daemon_args,
        } => run_cmd::run(release, &daemon_args),
        Cmd::Lab { action, name } => lab_cmd::lab(action, &name),
        Cmd::Vm {
            cmd,
            ip,
            daemon_args,
        } => vm_cmd::vm(cmd.as_deref(), &ip, &daemon_args),
        Cmd::Dist => dist_cmd::dist().map(|_| ()),
        Cmd::Test { cargo_args } => test_cmd::test(&cargo_args),
        Cmd::Fuzz { seconds, target } => fuzz_cmd::fuzz(seconds, target.as_deref()),
        Cmd::Bench(args) => bench_cmd::bench(args),
        Cmd::Soak { cycles, release } => soak_cmd::soak(cycles, release),
    };
    match result {
        Ok(()) => {}
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::exit(1);
        }
    }
}
