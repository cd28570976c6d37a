//! Times GPT-2 and BERT forward and forward+backward with each attention kind on the CPU, and
//! prints how far each kind's logits are from the naive ones.
//!
//! cargo run --release -p flash-ops-models --example attention_kinds -- \
//!     [--model gpt2|bert] [--batch 2] [--seq 512] [--embd 256] [--layers 4] [--heads 4] [--iters 3]

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flash_ops_models::{AttentionKind, BertConfig, BertForMaskedLM, Gpt2, Gpt2Config};
use flash_test_support::rel_err;

struct Args {
    model: String,
    batch: usize,
    seq: usize,
    embd: usize,
    layers: usize,
    heads: usize,
    iters: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        model: "gpt2".into(),
        batch: 2,
        seq: 512,
        embd: 256,
        layers: 4,
        heads: 4,
        iters: 3,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let [k, v] = pair else {
            bail!("expected --flag value pairs")
        };
        match k.as_str() {
            "--model" => a.model = v.clone(),
            "--batch" => a.batch = v.parse()?,
            "--seq" => a.seq = v.parse()?,
            "--embd" => a.embd = v.parse()?,
            "--layers" => a.layers = v.parse()?,
            "--heads" => a.heads = v.parse()?,
            "--iters" => a.iters = v.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Mean seconds of `f` over `iters` runs after one warm-up.
fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<()> {
    let a = args()?;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let ids: Vec<u32> = (0..a.batch * a.seq)
        .map(|i| ((i * 7919 + 13) % 1000) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), &dev)?;
    // BERT: rows of decreasing length, right-padded.
    let lengths: Vec<usize> = (0..a.batch)
        .map(|i| a.seq - i * a.seq / (2 * a.batch))
        .collect();
    let mut forward: Box<dyn FnMut(AttentionKind, bool) -> Result<Tensor>> = match a.model.as_str()
    {
        "gpt2" => {
            let cfg = Gpt2Config {
                vocab_size: 1000,
                n_positions: a.seq,
                n_embd: a.embd,
                n_layer: a.layers,
                n_head: a.heads,
                ..Gpt2Config::tiny()
            };
            let mut m = Gpt2::new(&cfg, vb, AttentionKind::Naive)?;
            Box::new(move |k, train| {
                m.set_attention(k);
                Ok(m.forward(&ids, train)?)
            })
        }
        "bert" => {
            let cfg = BertConfig {
                vocab_size: 1000,
                max_position_embeddings: a.seq,
                hidden_size: a.embd,
                intermediate_size: 4 * a.embd,
                num_hidden_layers: a.layers,
                num_attention_heads: a.heads,
                ..BertConfig::tiny()
            };
            let mut m = BertForMaskedLM::new(&cfg, vb, AttentionKind::Naive)?;
            Box::new(move |k, train| {
                m.set_attention(k);
                Ok(m.forward(&ids, &lengths, train)?)
            })
        }
        other => bail!("unknown model {other}"),
    };
    println!(
        "{} batch {} seq {} embd {} layers {} heads {} ({} threads)",
        a.model,
        a.batch,
        a.seq,
        a.embd,
        a.layers,
        a.heads,
        candle_core::utils::get_num_threads()
    );
    let reference = forward(AttentionKind::Naive, false)?;
    println!(
        "{:<8} {:>12} {:>16} {:>14}",
        "kind", "forward s", "fwd+bwd s", "rel err"
    );
    for kind in AttentionKind::ALL {
        let e = rel_err(&forward(kind, false)?, &reference);
        let fwd = time(a.iters, || forward(kind, false).map(|_| ()))?;
        let step = time(a.iters, || {
            forward(kind, true)?.sqr()?.mean_all()?.backward()?;
            Ok(())
        })?;
        println!(
            "{:<8} {fwd:>12.3} {step:>16.3} {e:>14.2e}",
            kind.to_string()
        );
    }
    Ok(())
}
