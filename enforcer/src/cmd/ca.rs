//! `enforcer ca init` and `enforcer ca export`: the local CA that signs intercepted TLS.

use std::process::ExitCode;

use crate::{
    ca::{self, Ca, CaError},
    config::Config,
};

#[derive(clap::Subcommand, Debug)]
pub enum CaCommand {
    /// Create the local CA in `<state_dir>/ca` (never replacing one) and write the bundle of
    /// system roots, `tls.extra_upstream_roots` and the CA that `enforcer exec` points TLS
    /// clients at (`<runtime_dir>/ca-bundle.pem`, readable by every user).
    Init,
    /// Print the CA certificate (PEM), e.g. to install it where an enrolled service looks.
    Export,
}

pub fn run(cmd: CaCommand, config: &Config) -> ExitCode {
    let dir = Ca::dir_in(&config.state_dir);
    match cmd {
        CaCommand::Init => match Ca::open_or_create(&dir) {
            Ok((ca, origin)) => {
                let bundle = config.ca_bundle_path();
                match ca.write_bundle(&bundle, &config.tls.extra_upstream_roots) {
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("enforcer ca init: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let what = match origin {
                    ca::Origin::Created => "created",
                    ca::Origin::Existing => "already exists, not replaced:",
                };
                eprintln!(
                    "enforcer ca init: CA {what} {} (sha256 {})\nbundle: {}",
                    dir.join(ca::CERT_FILE).display(),
                    ca.fingerprint(),
                    bundle.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("enforcer ca init: {e}");
                ExitCode::FAILURE
            }
        },
        CaCommand::Export => {
            // Reading the certificate needs no key: `ca export` works for any user who can
            // read the state directory.
            let path = dir.join(ca::CERT_FILE);
            match std::fs::read_to_string(&path) {
                Ok(pem) => {
                    print!("{pem}");
                    ExitCode::SUCCESS
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("enforcer ca export: {}", CaError::Missing { dir });
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("enforcer ca export: cannot read {}: {e}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
