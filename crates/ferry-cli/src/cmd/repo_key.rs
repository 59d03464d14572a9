//! `ferry repo key list|add|remove` and the `--kms` flags every repository command takes
//! (ADR 0182): key slots wrapped by AWS KMS beside password slots.

use crate::cmd::repo::RepoArgs;
use anyhow::{Context, bail};
use ferry_core::Secret;
use ferry_repo::{KdfParams, KmsKey, KmsUnlock, Repository, Store, Unlock};
use std::path::PathBuf;
use std::process::ExitCode;

/// AWS KMS options of a repository command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KmsArgs {
    /// AWS KMS key (id, ARN or alias). `repo init` and `repo key add`: the key that wraps the
    /// new key slot. Other commands: unlock with a KMS key slot (of KEYID, if given) even when
    /// a password is set; without a password a KMS slot is used anyway.
    #[arg(long, value_name = "KEYID", num_args = 0..=1, default_missing_value = "")]
    kms: Option<String>,
    /// Region of the new slot's KMS key (default: the ARN's, else AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    kms_region: Option<String>,
    /// KMS endpoint URL: stored in a new slot; for other commands it replaces the slot's
    /// (default: AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL, else the region's public endpoint).
    #[arg(long, value_name = "URL")]
    kms_endpoint: Option<String>,
}

impl KmsArgs {
    /// How to unlock: `password` unless `--kms` forces a KMS slot.
    pub fn unlock(&self, password: Option<Secret>) -> Unlock {
        Unlock {
            password,
            kms: KmsUnlock {
                force: self.kms.is_some(),
                key_id: self.kms.clone().filter(|k| !k.is_empty()),
                endpoint: self.kms_endpoint.clone(),
            },
        }
    }

    /// The key a new slot is wrapped with (`repo init`, `repo key add`), if `--kms` was given.
    pub fn new_slot_key(&self) -> anyhow::Result<Option<KmsKey>> {
        match self.kms.as_deref() {
            None if self.kms_region.is_some() || self.kms_endpoint.is_some() => {
                bail!("--kms-region and --kms-endpoint describe the key given with --kms KEYID")
            }
            None => Ok(None),
            Some("") => bail!("--kms needs the KMS key (id, ARN or alias) here"),
            Some(k) => Ok(Some(KmsKey {
                key_id: k.to_string(),
                region: self.kms_region.clone(),
                endpoint: self.kms_endpoint.clone(),
            })),
        }
    }
}

/// `ferry repo key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// List the key slots: password and AWS KMS slots (key, region, endpoint; never secrets).
    List(ListArgs),
    /// Add a key slot: `--kms KEYID` wraps the key with an AWS KMS key; otherwise a new
    /// password (FERRY_NEW_PASSWORD or --new-password-file). The repository is unlocked with
    /// the password, else with an existing KMS slot.
    Add(AddArgs),
    /// Remove a key slot (refused for the last usable one).
    Remove(RemoveArgs),
}

/// Arguments of `ferry repo key list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `ferry repo key add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// File holding the new password (first line); default: the FERRY_NEW_PASSWORD variable.
    #[arg(long, conflicts_with = "kms")]
    new_password_file: Option<PathBuf>,
}

/// Arguments of `ferry repo key remove`.
#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The slot, as `repo key list` shows it (`keys/ID` or `ID`).
    slot: String,
}

/// Runs a `repo key` subcommand.
pub async fn run(cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeyCommand::List(a) => list(a).await,
        KeyCommand::Add(a) => add(a).await,
        KeyCommand::Remove(a) => remove(a).await,
    }
}

async fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let slots = repo.key_slots().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&slots)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<22} {:<10} {:<26} KEY", "SLOT", "KIND", "CREATED");
    for s in &slots {
        let what = match s.kind {
            "aws-kms" => format!(
                "{} ({}, region {}{})",
                s.kms_key_id.as_deref().unwrap_or("?"),
                s.kms_key_arn.as_deref().unwrap_or("?"),
                s.region.as_deref().unwrap_or("?"),
                s.endpoint
                    .as_deref()
                    .map(|e| format!(", endpoint {e}"))
                    .unwrap_or_default()
            ),
            "password" => "-".into(),
            _ => s.error.clone().unwrap_or_default(),
        };
        println!(
            "{:<22} {:<10} {:<26} {what}",
            s.key,
            s.kind,
            s.created.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn add(a: AddArgs) -> anyhow::Result<ExitCode> {
    let kms = a.repo.kms().new_slot_key()?;
    // The --kms flags describe the new slot here; unlock by password, else by any KMS slot.
    let location = a.repo.location().to_string();
    let store = Store::open(&location, false)
        .with_context(|| format!("cannot open repository {location}"))?;
    let unlock = Unlock {
        password: a.repo.password()?,
        ..Default::default()
    };
    let repo = Repository::open_with(store, &unlock)
        .await
        .with_context(|| format!("cannot open repository {location}"))?;
    let key = match kms {
        Some(k) => {
            let key = repo.add_kms_slot(&k).await?;
            println!("added key slot {key} (AWS KMS key {})", k.key_id);
            return Ok(ExitCode::SUCCESS);
        }
        None => {
            let new = crate::cmd::repo::read_new_password(a.new_password_file.as_deref())?;
            repo.add_password(&new, KdfParams::default()).await?
        }
    };
    println!("added key slot {key} (password)");
    Ok(ExitCode::SUCCESS)
}

async fn remove(a: RemoveArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let key = repo.remove_key_slot(&a.slot).await?;
    println!("removed key slot {key}");
    Ok(ExitCode::SUCCESS)
}
