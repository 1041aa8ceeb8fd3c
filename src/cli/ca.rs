//! `arpcp ca`: make the cluster CA and issue certificates with a role in them. Prints
//! the files it wrote, one per line, so a script can pick them up.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::tls::ca::{
    self, IssueRequest, Validity, DEFAULT_DAYS, DEFAULT_DIR, DEFAULT_GATEWAY_NAME,
};
use crate::tls::Role;

#[derive(clap::Args)]
pub struct CaCmd {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(clap::Subcommand)]
enum CaCommand {
    /// Create the cluster CA (ECDSA P-256): ca.pem and ca-key.pem (0600) in DIR.
    Init {
        /// Directory of the CA and the certificates it issues.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the CA in DIR: NAME.pem and NAME-key.pem (0600).
    Issue {
        #[command(subcommand)]
        kind: IssueKind,
    },
    /// Revoke NAME's certificate: add it to the CA's revocation list DIR/crl.pem,
    /// which daemons re-read within a second of it changing.
    Revoke {
        /// The name the certificate was issued to (DIR/NAME.pem).
        name: String,
        /// Directory of the CA and the certificate.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}

#[derive(clap::Subcommand)]
enum IssueKind {
    /// An agent's certificate (serves ARPCP, announces itself to the gateway).
    Agent {
        /// The agent's name (CN; also a SAN when it is a host name or an address).
        name: String,
        #[command(flatten)]
        opts: IssueOpts,
    },
    /// The gateway's certificate (serves gRPC and ARPCP, dials agents).
    Gateway {
        /// The gateway's name (CN; also a SAN when it is a host name or an address).
        #[arg(default_value = DEFAULT_GATEWAY_NAME)]
        name: String,
        #[command(flatten)]
        opts: IssueOpts,
    },
    /// A client's certificate, with the role it may act in.
    Client {
        /// The client's name (CN).
        name: String,
        /// What the client may do.
        #[arg(long, value_enum)]
        role: ClientRole,
        #[command(flatten)]
        opts: IssueOpts,
    },
}

#[derive(clap::Args)]
struct IssueOpts {
    /// Directory of the CA; the certificate is written there.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Days the certificate is valid (1 to 3650).
    #[arg(long, default_value_t = DEFAULT_DAYS)]
    days: u32,
    /// Another host name or IP address the holder is reached at; repeatable.
    #[arg(long = "san")]
    sans: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ClientRole {
    /// get, list, watch, describe
    Reader,
    /// a reader that also submits and cancels its own tasks
    Submitter,
    /// a submitter that also cancels any task and changes the blacklist
    Operator,
}

impl From<ClientRole> for Role {
    fn from(r: ClientRole) -> Role {
        match r {
            ClientRole::Reader => Role::Reader,
            ClientRole::Submitter => Role::Submitter,
            ClientRole::Operator => Role::Operator,
        }
    }
}

pub fn run(cmd: CaCmd) -> anyhow::Result<()> {
    let written = match cmd.command {
        CaCommand::Revoke { name, dir } => {
            let revoked = ca::revoke(&dir, &name).context("ca revoke")?;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "revoked {name} (serial {}) in {} (CRL number {})",
                revoked.serial,
                revoked.crl.display(),
                revoked.crl_number
            );
            return Ok(());
        }
        CaCommand::Init { dir } => ca::init(&dir).context("ca init")?,
        CaCommand::Issue { kind } => {
            let (role, name, opts) = match kind {
                IssueKind::Agent { name, opts } => (Role::Agent, name, opts),
                IssueKind::Gateway { name, opts } => (Role::Gateway, name, opts),
                IssueKind::Client { name, role, opts } => (role.into(), name, opts),
            };
            let req = IssueRequest {
                role,
                name,
                sans: opts.sans,
                validity: Validity::days(opts.days)?,
            };
            ca::issue(&opts.dir, &req).context("ca issue")?
        }
    };
    // A closed stdout must not turn files already written into a failure.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", written.cert.display());
    let _ = writeln!(out, "{}", written.key.display());
    Ok(())
}
