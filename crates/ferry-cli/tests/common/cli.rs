//! What the appliance tests (`serve.rs`, `scale_out.rs`) share: the `ferry` binary with a clean
//! environment, and the JSON line a child prints when it is ready.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command};

/// The `ferry` binary, with no inherited log level, config or repository password.
pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("RUST_LOG")
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_PASSWORD");
    c
}

/// The first line `child` prints on stdout, parsed as JSON.
pub fn first_line(child: &mut Child) -> Value {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}
