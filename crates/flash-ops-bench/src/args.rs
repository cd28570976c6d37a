//! The `cargo bench` harnesses' command lines (`harness = false`: no clap, plain `--name v,v`).

use candle_core::{bail, Result};

/// The comma-separated values after `--name`, if given.
pub fn arg_list(args: &[String], name: &str) -> Result<Option<Vec<String>>> {
    let Some(i) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    match args.get(i + 1) {
        Some(v) => Ok(Some(v.split(',').map(str::to_string).collect())),
        None => bail!("`{name}` needs a value"),
    }
}

/// The numbers after `--name`, or `default`.
pub fn nums(args: &[String], name: &str, default: &[usize]) -> Result<Vec<usize>> {
    let Some(v) = arg_list(args, name)? else {
        return Ok(default.to_vec());
    };
    v.iter()
        .map(|x| match x.parse() {
            Ok(n) => Ok(n),
            Err(_) => bail!("`{name}` takes numbers, got `{x}`"),
        })
        .collect()
}

/// The one number after `--name`, or `default`.
pub fn num(args: &[String], name: &str, default: usize) -> Result<usize> {
    match nums(args, name, &[default])?.as_slice() {
        [n] => Ok(*n),
        _ => bail!("`{name}` takes one number"),
    }
}
