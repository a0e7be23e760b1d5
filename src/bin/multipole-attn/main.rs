//! `multipole-attn`: run Fast Multipole Attention (or dense attention) on .npy tensors, on the
//! GPU or with the f64 CPU reference, list the GPU adapters wgpu finds, and check each of
//! them against the reference (`doctor`).
//!
//! Every error prints as `error: <message>` on stderr; the exit code is 2 for bad input and
//! 1 for a GPU or runtime failure (see [`error::CliError::exit_code`]).

#[macro_use]
mod stdout;

mod args;
mod decode;
mod doctor;
mod error;
mod grad;
mod headless;
mod info;
mod npy_io;
mod npz;
mod plan;
mod run;
mod tensor;
mod weights_npz;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::init();
    // clap prints its own `error: ...` and exits with 2 on a usage error.
    let cli = args::Cli::parse();
    // Before any thread or wgpu instance exists (headless.rs says why); removed when dropped.
    let _runtime_dir = headless::quiet_window_system_probe();
    let result = match &cli.command {
        args::Command::Run(a) => run::run(a),
        args::Command::Grad(a) => grad::grad(a),
        args::Command::Decode(a) => decode::decode(a),
        args::Command::Info => info::info(),
        args::Command::Doctor(a) => doctor::doctor(a),
        args::Command::Plan(a) => plan::plan(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
