//! Cross-check tool: runs flash-ops forward and backward on tensors from a safetensors file and
//! writes the results, so any other implementation (PyTorch, flash-attn) can be compared on the
//! very same inputs. `scripts/crosscheck_torch.py` drives it.
//!
//! ```text
//! flash-ops-check --input IN.safetensors --output OUT.safetensors [--causal] [--scale S]
//!   [--window-left L] [--window-right R] [--softcap C] [--algorithm v1|v2] [--dtype f32|f16|bf16]
//!   [--block-size BQ,BK]
//! ```
//! IN holds `q` (b, sq, hq, d), `k` and `v` (b, sk, hk, d), `do` (b, sq, hq, d), all f32, and
//! optionally `alibi_slopes` (hq). OUT gets `o`, `lse` (b, hq, sq), `dq`, `dk`, `dv`, all f32.
//! A window of -1 (or absent) is unbounded on that side.
//!
//! When IN also holds `prefix_k` and `prefix_v` (1, sp, hk, d), a prefix shared by the whole
//! batch, it runs shared-prefix attention ([`flash_ops::shared_prefix_attention_with_lse`]):
//! each sequence attends to `[prefix; its k, v]`, causal (bottom-right over the concatenation)
//! applying to the suffix; OUT then also gets `dprefix_k` and `dprefix_v`.
//!
//! Block-sparse attention: IN's optional `block_mask`, u8 `(hq or 1, ceil(sq/BQ), ceil(sk/BK))`
//! (nonzero = the block is visited, whole), with `--block-size BQ,BK` (each needs the other),
//! becomes the options' [`flash_ops::BlockMask`] through `BlockMask::from_block_layout`.

use std::collections::HashMap;
use std::process::ExitCode;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use flash_ops::{
    flash_attn_with_lse, shared_prefix_attention_with_lse, Algorithm, AttnOptions, BlockMask,
    PrefixLevel,
};

const USAGE: &str = "usage: flash-ops-check --input IN.safetensors --output OUT.safetensors [--causal] \
[--scale S] [--window-left L] [--window-right R] [--softcap C] [--algorithm v1|v2] [--dtype f32|f16|bf16] \
[--block-size BQ,BK]";

struct Args {
    input: String,
    output: String,
    opts: AttnOptions,
    dtype: DType,
    /// `--block-size`: the block mask's (bq, bk).
    block: Option<(usize, usize)>,
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

/// `BQ,BK`.
fn block_size(flag: &str, v: &str) -> Result<(usize, usize)> {
    match v.split_once(',') {
        Some((bq, bk)) => Ok((number(flag, bq)?, number(flag, bk)?)),
        None => bail!("{flag} expects BQ,BK (two block sizes), got `{v}`"),
    }
}

fn parse(argv: &[String]) -> Result<Args> {
    let (mut input, mut output) = (None, None);
    let mut block = None;
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
            "--block-size" => block = Some(block_size(flag, value(flag, &mut it)?)?),
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
        block,
    })
}

fn tensor(map: &HashMap<String, Tensor>, name: &str, path: &str) -> Result<Tensor> {
    match map.get(name) {
        Some(t) if t.dtype() == DType::F32 => Ok(t.clone()),
        Some(t) => bail!("tensor `{name}` in {path} must be f32, got {:?}", t.dtype()),
        None => bail!(
            "{path} has no tensor `{name}` (needs q, k, v, do; optional alibi_slopes, prefix_k with prefix_v)"
        ),
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
    match (map.get("block_mask"), args.block) {
        (None, None) => {}
        (Some(layout), Some(block)) => {
            if layout.dtype() != DType::U8 {
                bail!(
                    "tensor `block_mask` in {} must be u8, got {:?}",
                    args.input,
                    layout.dtype()
                )
            }
            let mask = match BlockMask::from_block_layout(layout, q.dim(1)?, k.dim(1)?, block) {
                Ok(m) => m,
                Err(e) => bail!("tensor `block_mask` with --block-size {block:?}: {e}"),
            };
            opts = opts.block_mask(mask);
        }
        (Some(_), None) => bail!(
            "{} holds `block_mask`: give its block size with --block-size BQ,BK",
            args.input
        ),
        (None, Some(_)) => bail!(
            "--block-size needs a `block_mask` tensor (u8, (hq or 1, q blocks, k blocks)) in {}",
            args.input
        ),
    }
    if d_out.dims() != q.dims() {
        bail!(
            "`do` must have the shape of `q` {:?}, got {:?}",
            q.dims(),
            d_out.dims()
        )
    }
    let prefix = match (map.contains_key("prefix_k"), map.contains_key("prefix_v")) {
        (false, false) => None,
        (true, true) => {
            let pk = tensor(&map, "prefix_k", &args.input)?;
            let pv = tensor(&map, "prefix_v", &args.input)?;
            if pk.rank() != 4 || pk.dim(0)? != 1 {
                bail!(
                    "`prefix_k` must be (1, sp, hk, d), one prefix shared by the batch, got {:?}",
                    pk.dims()
                )
            }
            Some((pk, pv))
        }
        _ => bail!(
            "{} must hold both `prefix_k` and `prefix_v`, or neither",
            args.input
        ),
    };
    let var = |t: &Tensor| -> Result<Var> { Var::from_tensor(&t.to_dtype(args.dtype)?) };
    let (qv, kv, vv) = (var(&q)?, var(&k)?, var(&v)?);
    let prefix = match &prefix {
        Some((pk, pv)) => Some((var(pk)?, var(pv)?)),
        None => None,
    };
    let (o, lse) = match &prefix {
        None => flash_attn_with_lse(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &opts)?,
        Some((pk, pv)) => {
            let levels = [PrefixLevel::shared(pk, pv, q.dim(0)?)];
            shared_prefix_attention_with_lse(&qv, &levels, &kv, &vv, &opts)?
        }
    };
    let grads = (o.to_dtype(DType::F32)? * &d_out)?.sum_all()?.backward()?;
    let grad = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(g) => g.to_dtype(DType::F32),
            None => bail!("no gradient reached an input"),
        }
    };
    let mut out: HashMap<String, Tensor> = [
        ("o".to_string(), o.to_dtype(DType::F32)?),
        ("lse".to_string(), lse),
        ("dq".to_string(), grad(&qv)?),
        ("dk".to_string(), grad(&kv)?),
        ("dv".to_string(), grad(&vv)?),
    ]
    .into_iter()
    .collect();
    if let Some((pk, pv)) = &prefix {
        out.insert("dprefix_k".to_string(), grad(pk)?);
        out.insert("dprefix_v".to_string(), grad(pv)?);
    }
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
