//! The demo.
use std::process::ExitCode;

use super::cli::DemoArgs;

/// Runs the demo from the command line.
pub async fn run_cli(_args: DemoArgs) -> ExitCode {
    ExitCode::SUCCESS
}
