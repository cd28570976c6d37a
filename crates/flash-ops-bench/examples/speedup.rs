//! Flash attention forward+backward on random data next to naive attention: checks that both
//! agree and prints the speedup and the memory each needed.
//!
//! `cargo run --release -p flash-ops-bench --example speedup [-- N]` (default N = 2048, 12 heads, d 64).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_ops::{flash_attn, reference::naive_attention, AttnOptions};

fn step(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    vars: &[Var; 3],
    d_out: &Tensor,
) -> Result<(f64, Tensor, Tensor)> {
    let t = Instant::now();
    let o = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let grads = (&o * d_out)?.sum_all()?.backward()?;
    let dq = grads.get(vars[0].as_tensor()).expect("dq").clone();
    Ok((t.elapsed().as_secs_f64(), o, dq))
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N must be a number"))
        .unwrap_or(2048);
    let (h, d) = (12, 64);
    let dev = Device::Cpu;
    let mk = || Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?);
    let vars = [mk()?, mk()?, mk()?];
    let d_out = Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?;
    let opts = AttnOptions::new().causal(true);
    println!("causal attention, f32, batch 1, {h} heads, N = {n}, d = {d}: forward + backward");
    let flash = |q: &Tensor, k: &Tensor, v: &Tensor| flash_attn(q, k, v, &opts);
    let naive = |q: &Tensor, k: &Tensor, v: &Tensor| naive_attention(q, k, v, &opts);
    let (t_flash, o_flash, dq_flash) = step(&flash, &vars, &d_out)?;
    println!("  flash V2: {:8.1} ms", t_flash * 1e3);
    let (t_naive, o_naive, dq_naive) = step(&naive, &vars, &d_out)?;
    println!("  naive   : {:8.1} ms", t_naive * 1e3);
    let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
        let diff = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok((diff / b.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt())
    };
    println!(
        "  speedup {:.2}×; relative difference: output {:.1e}, dq {:.1e}",
        t_naive / t_flash,
        rel(&o_flash, &o_naive)?,
        rel(&dq_flash, &dq_naive)?
    );
    let scores_mb = (n * n * h * DType::F32.size_in_bytes()) as f64 / 1e6;
    println!("  naive materialises {h}×{n}×{n} score and probability matrices ({scores_mb:.0} MB each); flash keeps 128×128 tiles");
    Ok(())
}
