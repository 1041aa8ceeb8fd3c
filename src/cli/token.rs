//! `arpcp token`: bearer tokens for the gRPC API of a gateway started with
//! `--tls-dir`, kept hashed in the gateway's data directory. Run on the gateway's
//! host; a running gateway picks changes up within a second.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use super::output::table;
use crate::durable::GATEWAY_STORE;
use crate::gateway::tokens;
use crate::tls::Role;

#[derive(clap::Args)]
pub struct TokenCmd {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand)]
enum TokenCommand {
    /// Make a token for NAME with a role and print it (it is shown only this once).
    Create {
        /// A unique name for the token's holder (letters, digits, '.', '-', '_').
        name: String,
        /// What the holder may do.
        #[arg(long, value_enum)]
        role: TokenRole,
        #[command(flatten)]
        dir: DataDir,
    },
    /// List the tokens (names, roles, creation times; never the tokens).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Revoke NAME's token; the gateway refuses it from the next second on.
    Revoke {
        name: String,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(clap::Args)]
struct DataDir {
    /// The gateway's data directory (its --data-dir).
    #[arg(long, default_value = "arpcp-gateway-data")]
    data_dir: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TokenRole {
    /// get, list, watch, describe
    Reader,
    /// a reader that also submits and cancels its own tasks
    Submitter,
    /// a submitter that also cancels any task and changes the blacklist
    Operator,
}

impl From<TokenRole> for Role {
    fn from(r: TokenRole) -> Role {
        match r {
            TokenRole::Reader => Role::Reader,
            TokenRole::Submitter => Role::Submitter,
            TokenRole::Operator => Role::Operator,
        }
    }
}

impl DataDir {
    /// The directory, which `list` and `revoke` need to exist: a wrong path there
    /// would read as "no tokens" or "no such token".
    fn existing(&self) -> anyhow::Result<&Path> {
        if self.data_dir.is_dir() {
            Ok(&self.data_dir)
        } else {
            Err(super::usage(format!(
                "--data-dir {}: no such directory; pass the gateway's --data-dir",
                self.data_dir.display()
            )))
        }
    }

    /// Says so on stderr when the directory holds no gateway store (yet): tokens
    /// may be made before the gateway's first start, but a mistyped path makes a
    /// token no gateway will ever accept.
    fn warn_unless_gateway(&self) {
        if !self.data_dir.join(GATEWAY_STORE).exists() {
            let shown = std::path::absolute(&self.data_dir).unwrap_or(self.data_dir.clone());
            eprintln!(
                "note: {} holds no gateway store ({GATEWAY_STORE}) yet: only a gateway started with --data-dir {} accepts this token",
                shown.display(),
                shown.display()
            );
        }
    }
}

pub fn run(cmd: TokenCmd) -> anyhow::Result<()> {
    // A closed stdout must not turn a file already written into a failure.
    let mut out = std::io::stdout().lock();
    match cmd.command {
        TokenCommand::Create { name, role, dir } => {
            dir.warn_unless_gateway();
            let token =
                tokens::create(&dir.data_dir, &name, role.into()).context("token create")?;
            let _ = writeln!(out, "{token}");
        }
        TokenCommand::List { json, dir } => {
            let listed = tokens::list(dir.existing()?).context("token list")?;
            if json {
                for t in &listed {
                    let line = json!({"name": t.name, "role": t.role, "created_ms": t.created_ms});
                    let _ = writeln!(out, "{line}");
                }
            } else {
                let rows: Vec<Vec<String>> = listed
                    .iter()
                    .map(|t| vec![t.name.clone(), t.role.clone(), created(t.created_ms)])
                    .collect();
                drop(out);
                table(&["NAME", "ROLE", "CREATED"], &rows);
            }
        }
        TokenCommand::Revoke { name, dir } => {
            let removed = tokens::revoke(dir.existing()?, &name).context("token revoke")?;
            let _ = writeln!(out, "revoked {} ({})", removed.name, removed.role);
        }
    }
    Ok(())
}

fn created(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}
