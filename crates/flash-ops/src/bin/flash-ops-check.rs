//! Cross-check tool: runs flash-ops forward and backward on tensors from a safetensors file and
//! writes the results, so any other implementation (PyTorch, flash-attn) can be compared on the
//! very same inputs. `scripts/crosscheck_torch.py` drives it.
//!
//! ```text
//! flash-ops-check --input IN.safetensors --output OUT.safetensors [--causal] [--scale S]
//!   [--window-left L] [--window-right R] [--softcap C] [--algorithm v1|v2] [--dtype f32|f16|bf16]
//! ```
//! IN holds `q` (b, sq, hq, d), `k` and `v` (b, sk, hk, d), `do` (b, sq, hq, d), all f32, and
//! optionally `alibi_slopes` (hq). OUT gets `o`, `lse` (b, hq, sq), `dq`, `dk`, `dv`, all f32.
//! A window of -1 (or absent) is unbounded on that side.

use std::collections::HashMap;
use std::process::ExitCode;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use flash_ops::{flash_attn_with_lse, Algorithm, AttnOptions};

const USAGE: &str = "usage: flash-ops-check --input IN.safetensors --output OUT.safetensors [--causal] \
[--scale S] [--window-left L] [--window-right R] [--softcap C] [--algorithm v1|v2] [--dtype f32|f16|bf16]";

struct Args {
    input: String,
    output: String,
    opts: AttnOptions,
    dtype: DType,
}

fn value<'a>(flag: &str, it: &mut impl Iterator<Item = &'a String>) -> Result<&'a String> {
    match it.next() {
        Some(v) => Ok(v),
        None => bail!("{flag} needs a value"),
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T> {
    match v.parse() {
        Ok(x) => Ok(x),
        Err(_) => bail!("{flag} expects a number, got `{v}`"),
    }
}

/// `-1` is unbounded; any other negative value is an error.
fn window(flag: &str, v: &str) -> Result<Option<usize>> {
    match number::<i64>(flag, v)? {
        -1 => Ok(None),
        w if w >= 0 => Ok(Some(w as usize)),
        w => bail!("{flag} must be -1 (unbounded) or >= 0, got {w}"),
    }
}

fn parse(argv: &[String]) -> Result<Args> {
    let (mut input, mut output) = (None, None);
    let mut opts = AttnOptions::new();
    let mut dtype = DType::F32;
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--input" => input = Some(value(flag, &mut it)?.clone()),
            "--output" => output = Some(value(flag, &mut it)?.clone()),
            "--causal" => opts.causal = true,
            "--scale" => opts.softmax_scale = Some(number(flag, value(flag, &mut it)?)?),
            "--window-left" => opts.window_left = window(flag, value(flag, &mut it)?)?,
            "--window-right" => opts.window_right = window(flag, value(flag, &mut it)?)?,
            "--softcap" => opts.softcap = Some(number(flag, value(flag, &mut it)?)?),
            "--algorithm" => {
                opts.algorithm = match value(flag, &mut it)?.as_str() {
                    "v1" => Algorithm::V1,
                    "v2" => Algorithm::V2,
                    other => bail!("--algorithm expects v1 or v2, got `{other}`"),
                }
            }
            "--dtype" => {
                dtype = match value(flag, &mut it)?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => bail!("--dtype expects f32, f16 or bf16, got `{other}`"),
                }
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        bail!("--input and --output are required")
    };
    Ok(Args {
        input,
        output,
        opts,
        dtype,
    })
}

fn tensor(map: &HashMap<String, Tensor>, name: &str, path: &str) -> Result<Tensor> {
    match map.get(name) {
        Some(t) if t.dtype() == DType::F32 => Ok(t.clone()),
        Some(t) => bail!("tensor `{name}` in {path} must be f32, got {:?}", t.dtype()),
        None => bail!("{path} has no tensor `{name}` (needs q, k, v, do; optional alibi_slopes)"),
    }
}

fn run(args: Args) -> Result<()> {
    let map = match candle_core::safetensors::load(&args.input, &Device::Cpu) {
        Ok(m) => m,
        Err(e) => bail!("cannot read --input {}: {e}", args.input),
    };
    let q = tensor(&map, "q", &args.input)?;
    let k = tensor(&map, "k", &args.input)?;
    let v = tensor(&map, "v", &args.input)?;
    let d_out = tensor(&map, "do", &args.input)?;
    let mut opts = args.opts;
    if map.contains_key("alibi_slopes") {
        opts.alibi_slopes = Some(tensor(&map, "alibi_slopes", &args.input)?);
    }
    if d_out.dims() != q.dims() {
        bail!(
            "`do` must have the shape of `q` {:?}, got {:?}",
            q.dims(),
            d_out.dims()
        )
    }
    let qv = Var::from_tensor(&q.to_dtype(args.dtype)?)?;
    let kv = Var::from_tensor(&k.to_dtype(args.dtype)?)?;
    let vv = Var::from_tensor(&v.to_dtype(args.dtype)?)?;
    let (o, lse) = flash_attn_with_lse(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &opts)?;
    let grads = (o.to_dtype(DType::F32)? * &d_out)?.sum_all()?.backward()?;
    let grad = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(g) => g.to_dtype(DType::F32),
            None => bail!("no gradient reached an input"),
        }
    };
    let out: HashMap<String, Tensor> = [
        ("o".to_string(), o.to_dtype(DType::F32)?),
        ("lse".to_string(), lse),
        ("dq".to_string(), grad(&qv)?),
        ("dk".to_string(), grad(&kv)?),
        ("dv".to_string(), grad(&vv)?),
    ]
    .into_iter()
    .collect();
    match candle_core::safetensors::save(&out, &args.output) {
        Ok(()) => Ok(()),
        Err(e) => bail!("cannot write --output {}: {e}", args.output),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flash-ops-check: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flash-ops-check: {e}");
            ExitCode::FAILURE
        }
    }
}
