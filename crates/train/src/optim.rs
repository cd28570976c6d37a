//! AdamW over a `VarMap`'s named parameters, with per-parameter weight decay (none on norms,
//! biases and embeddings), optional f32 master weights for bf16/f16 models, global-norm gradient
//! clipping, and the warmup + cosine learning-rate schedule.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use flash_ops_models::rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Whether weight decay applies: matrices only, and not the token/position embeddings.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !(name.contains("wte") || name.contains("wpe") || name.contains("embeddings"))
}

fn is_norm(name: &str) -> bool {
    name.contains(".ln_")
        || name.starts_with("ln_")
        || name.contains("ln_f")
        || name.contains("LayerNorm")
        || name.contains("layer_norm")
}

/// The init seed of tensor `name`: a hash of the name offset by the run seed, so each tensor's
/// init is independent of the order the model creates them in.
fn name_seed(seed: u64, name: &str) -> u64 {
    rng::offset(rng::fnv1a(name.bytes().map(u64::from)), seed)
}

/// Re-initialises every parameter from `seed` (candle's CPU RNG cannot be seeded): GPT-2/BERT
/// init, N(0, 0.02) for matrices and embeddings, N(0, 0.02/sqrt(2·layers)) for the projections
/// into the residual stream (GPT-2 paper), zero biases, unit norm gains.
pub fn init_params(
    varmap: &VarMap,
    seed: u64,
    n_layer: usize,
    residual_scaled: bool,
) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let shape = var.shape().clone();
        let dev = var.device().clone();
        let value = if is_norm(name) && name.ends_with("weight") {
            Tensor::ones(shape, DType::F32, &dev)?
        } else if name.ends_with("bias") || shape.rank() < 2 {
            Tensor::zeros(shape, DType::F32, &dev)?
        } else {
            let std = if residual_scaled && name.ends_with("c_proj.weight") {
                0.02 / (2.0 * n_layer as f64).sqrt()
            } else {
                0.02
            };
            let normal = Normal::new(0f32, std as f32)?;
            let mut rng = ChaCha8Rng::seed_from_u64(name_seed(seed, name));
            let v: Vec<f32> = (0..shape.elem_count())
                .map(|_| normal.sample(&mut rng))
                .collect();
            Tensor::from_vec(v, shape, &dev)?
        };
        var.set(&value.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

struct Param {
    name: String,
    var: Var,
    /// f32 copy when the model runs in bf16/f16.
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    params: Vec<Param>,
    cfg: AdamWConfig,
    /// Number of updates applied.
    pub t: u64,
}

/// Gradients summed over micro-batches, in f32, by parameter name.
pub type Grads = BTreeMap<String, Tensor>;

impl AdamW {
    pub fn new(varmap: &VarMap, cfg: AdamWConfig) -> Result<Self> {
        let data = varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let params = names
            .into_iter()
            .map(|name| {
                let var = data[name].clone();
                let master = if var.dtype() == DType::F32 {
                    None
                } else {
                    Some(var.as_tensor().to_dtype(DType::F32)?)
                };
                let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Param {
                    name: name.clone(),
                    decay: decays(name, var.rank()),
                    var,
                    master,
                    m: z.clone(),
                    v: z,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, cfg, t: 0 })
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    pub fn num_tensors(&self) -> usize {
        self.params.len()
    }

    /// Adds this backward's gradients (divided by `div`) to `acc`.
    pub fn accumulate(
        &self,
        acc: &mut Grads,
        store: &candle_core::backprop::GradStore,
        div: f64,
    ) -> Result<()> {
        for p in &self.params {
            let Some(g) = store.get(p.var.as_tensor()) else {
                continue;
            };
            // Detached: gradients carry the backward graph (which holds the step's activations),
            // and the moments built from them would otherwise chain every step's graph together.
            let g = (g.detach().to_dtype(DType::F32)? / div)?;
            let sum = match acc.remove(&p.name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(p.name.clone(), sum);
        }
        Ok(())
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(grads: &Grads) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads.values() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(sq.sqrt())
    }

    /// One AdamW update with learning rate `lr`; gradients are first scaled by `grad_scale`
    /// (clipping and loss-scale removal). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let g = if grad_scale != 1.0 {
                g.affine(grad_scale, 0.0)?
            } else {
                g.clone()
            };
            p.m = (p.m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            p.v = (p.v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let update =
                (p.m.affine(1.0 / bc1, 0.0)? / (p.v.affine(1.0 / bc2, 0.0)?.sqrt()? + eps)?)?;
            let theta = match &p.master {
                Some(m) => m.clone(),
                None => p.var.as_tensor().clone(),
            };
            let decay = if p.decay { lr * weight_decay } else { 0.0 };
            let new = (theta.affine(1.0 - decay, 0.0)? - update.affine(lr, 0.0)?)?.detach();
            p.m = p.m.detach();
            p.v = p.v.detach();
            match &mut p.master {
                Some(m) => {
                    p.var.set(&new.to_dtype(p.var.dtype())?)?;
                    *m = new;
                }
                None => p.var.set(&new)?,
            }
        }
        Ok(())
    }

    /// The f32 parameters (master copies where they exist) by name: what checkpoints save.
    pub fn f32_params(&self) -> Result<BTreeMap<String, Tensor>> {
        self.params
            .iter()
            .map(|p| {
                let t = match &p.master {
                    Some(m) => m.clone(),
                    None => p.var.as_tensor().to_dtype(DType::F32)?,
                };
                Ok((p.name.clone(), t))
            })
            .collect()
    }

    /// Optimizer state: `exp_avg.NAME` and `exp_avg_sq.NAME`.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.m.clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.v.clone());
        }
        out
    }

    /// Restores parameters and moments written by [`Self::f32_params`] and [`Self::state`].
    pub fn load(
        &mut self,
        params: &HashMap<String, Tensor>,
        state: &HashMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        for p in &mut self.params {
            let get = |map: &HashMap<String, Tensor>, key: &str, what: &str| -> Result<Tensor> {
                let Some(x) = map.get(key) else {
                    bail!("checkpoint has no {what} `{key}`; it was written for a different model config, so start a new --out or match the checkpoint's config")
                };
                if x.dims() != p.var.dims() {
                    bail!(
                        "checkpoint {what} `{key}` has shape {:?} but the model expects {:?}; the checkpoint is from a different model config, so match its config or start a new --out",
                        x.dims(),
                        p.var.dims()
                    )
                }
                Ok(x.to_dtype(DType::F32)?.to_device(p.var.device())?)
            };
            let w = get(params, &p.name, "parameter")?;
            p.m = get(state, &format!("exp_avg.{}", p.name), "optimizer moment")?;
            p.v = get(state, &format!("exp_avg_sq.{}", p.name), "optimizer moment")?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
            if p.master.is_some() {
                p.master = Some(w);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio` at
/// `total` steps (GPT-3 / llm.c). `step` counts from 0.
pub fn lr_at(step: u64, peak: f64, warmup: u64, total: u64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let min = peak * min_ratio;
    if step >= total {
        return min;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    #[test]
    fn schedule_shape() {
        let lr = |s| lr_at(s, 1e-3, 10, 110, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(60) - 0.55e-3).abs() < 1e-9);
        assert!((lr(110) - 1e-4).abs() < 1e-12);
        assert!(lr(30) > lr(31));
    }

    #[test]
    fn decay_groups() {
        assert!(decays("transformer.h.0.attn.c_attn.weight", 2));
        assert!(!decays("transformer.h.0.attn.c_attn.bias", 1));
        assert!(!decays("transformer.h.0.ln_1.weight", 1));
        assert!(!decays("transformer.wte.weight", 2));
        assert!(!decays("bert.embeddings.word_embeddings.weight", 2));
    }

    /// One step against a hand-computed AdamW update (decoupled decay, bias correction).
    #[test]
    fn adamw_matches_formula() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((1, 2), "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let b = vb
            .get_with_hints(2, "b", candle_nn::Init::Const(1.0))
            .unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(&vm, cfg).unwrap();
        let loss = ((w.sum_all().unwrap() * 3.0).unwrap() + b.sum_all().unwrap()).unwrap();
        let mut acc = Grads::new();
        opt.accumulate(&mut acc, &loss.backward().unwrap(), 1.0)
            .unwrap();
        assert!((AdamW::grad_norm(&acc).unwrap() - (9.0f64 * 2.0 + 2.0).sqrt()).abs() < 1e-6);
        opt.step(&acc, 0.01, 1.0).unwrap();
        // Nothing the optimizer keeps may hold on to the step's autograd graph (a memory leak).
        assert!(opt
            .params
            .iter()
            .all(|p| !p.m.track_op() && !p.v.track_op()));
        assert!(acc.values().all(|g| !g.track_op()));
        let data = vm.data().lock().unwrap();
        let w1 = data["w"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b1 = data["b"].as_tensor().to_vec1::<f32>().unwrap();
        // First step: m̂ = g, v̂ = g², update = g/(|g|+eps) ≈ 1.
        let want_w = 1.0 * (1.0 - 0.01 * 0.1) - 0.01;
        let want_b = 1.0 - 0.01; // no decay on the vector
        assert!((w1[0] as f64 - want_w).abs() < 1e-6, "{w1:?}");
        assert!((b1[0] as f64 - want_b).abs() < 1e-6, "{b1:?}");
    }

    #[test]
    fn init_is_seeded() {
        let make = |seed| {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            vb.get((4, 8), "h.0.mlp.c_fc.weight").unwrap();
            vb.get(8, "h.0.ln_1.weight").unwrap();
            init_params(&vm, seed, 2, true).unwrap();
            let d = vm.data().lock().unwrap();
            (
                d["h.0.mlp.c_fc.weight"]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                d["h.0.ln_1.weight"].as_tensor().to_vec1::<f32>().unwrap(),
            )
        };
        let (a, ln) = make(1);
        assert_eq!(make(1).0, a);
        assert_ne!(make(2).0, a);
        assert!(ln.iter().all(|&x| x == 1.0));
        let std = (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt();
        assert!(std > 0.005 && std < 0.05, "{std}");
    }
}
