//! One module per subcommand (or subcommand group). Each exposes `Args` and
//! `pub async fn run(args: Args, global: &crate::Global) -> anyhow::Result<std::process::ExitCode>`.

pub mod agent_pin;
pub mod backup;
pub mod benchmark;
pub mod cleanup;
pub mod copy;
pub mod demo;
pub mod demo_hyperv;
pub mod export;
pub mod features;
pub mod files;
pub mod hvbackup;
pub mod image;
pub mod instant;
pub mod nbd;
pub mod replica;
pub mod repo;
pub mod repo_key;
pub mod restore;
pub mod serve;
pub mod sim;
pub mod source;
pub mod vms;
