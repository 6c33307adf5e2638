//! portwatch's development tasks: `cargo xtask <setup|build|run|test>`.

mod bench;
mod build;
mod cargo_deb;
mod deploy_tools;
mod fuzz;
mod package;
mod procstat;
mod run;
mod setup;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    // Usage lines show how it is invoked, not the binary's name.
    bin_name = "cargo xtask",
    about = "portwatch's setup, build, run and test tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and running needs (Debian packages, bpf-linker,
    /// the portwatch-bpf rustup toolchain); idempotent.
    Setup,
    /// Build portwatch with its eBPF programs.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build portwatch, then run it as root (through sudo when needed).
    Run {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
        /// Arguments for portwatch, after `--`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Benchmarks: per-packet verdict cost, drop throughput, the permitted
    /// path, the monitor and the cost to the host, as ratios against
    /// baselines measured in the same run.
    Bench {
        /// A short smoke run (fewer rounds): checks the harness, not for figures.
        #[arg(long)]
        quick: bool,
        /// Run only this section (verdict, veth, permitted, monitor, host, policy).
        #[arg(long)]
        only: Option<String>,
    },
    /// Redraws the SVG charts of a bench run's JSON (e.g. a saved
    /// bench/results/*.json) into bench/results/STEM-*.svg.
    Charts {
        /// The run's JSON.
        file: std::path::PathBuf,
        /// Name the charts start with (default: the file's stem).
        #[arg(long)]
        stem: Option<String>,
    },
    /// Differential testing of the XDP program against the reference model,
    /// with more cases than CI runs (PORTWATCH_PROOF_CASES per property).
    Proof {
        /// Cases per property test.
        #[arg(long, default_value_t = 250_000)]
        cases: u64,
    },
    /// A guard under listener churn, policy flips and traffic for N minutes
    /// (root; not in CI): its RSS must stay flat and no event may be lost
    /// uncounted. Writes bench/results/soak.{json,md}.
    Soak {
        /// How long the load runs.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Fuzz the policy file and spec parsers, the control request decoder and
    /// the ring-buffer decoders with cargo-fuzz, one target after another;
    /// writes target/fuzz/summary.json.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run only this target (policy_file, allow_spec, control_request,
        /// ring_event).
        #[arg(long)]
        target: Option<String>,
    },
    /// Build the Debian package (cargo-deb): the binary, the systemd unit, a
    /// default policy, man pages and shell completions; prints its path.
    Package {
        /// Package the debug build instead of the release build (quicker; CI).
        #[arg(long)]
        debug: bool,
        /// The whole Debian version, e.g. 0.1.0-2 (default: from Cargo.toml, revision 1).
        #[arg(long, value_name = "VERSION")]
        deb_version: Option<String>,
        /// Quicker, lighter compression.
        #[arg(long)]
        fast: bool,
    },
    /// fmt and clippy checks, unit tests, then kernel integration tests as root.
    Test {
        /// Arguments for the integration test binaries, after `--` (e.g. a test
        /// name filter).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Build { release } => build::build(release).map(drop),
        Task::Run { release, args } => run::run(release, &args),
        Task::Test { args } => test::test(&args),
        Task::Bench { quick, only } => bench::bench(quick, only.as_deref()),
        Task::Charts { file, stem } => bench::redraw(&file, stem.as_deref()),
        Task::Proof { cases } => test::proof(cases),
        Task::Fuzz { seconds, target } => fuzz::fuzz(seconds, target.as_deref()),
        Task::Soak { minutes } => soak::soak(minutes),
        Task::Package {
            debug,
            deb_version,
            fast,
        } => package::package(&package::Options {
            debug,
            deb_version: deb_version.as_deref(),
            fast,
            output: None,
        })
        .map(drop),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
