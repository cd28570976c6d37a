//! AdamW over a `VarMap`'s named parameters, with per-parameter weight decay (none on norms,
//! biases and embeddings), optional f32 master weights for bf16/f16 models, global-norm gradient
//! clipping, and the warmup + cosine learning-rate schedule.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};
use candle_nn::VarMap;
use flash_ops_models::rng;
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

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
    decay: bool,
    state: State,
}

/// A parameter's moments, and its f32 master copy when the model runs in bf16/f16.
enum State {
    /// CPU: host memory, updated with the parameter in one in-place pass ([`OnePass`]).
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
        master: Option<Vec<f32>>,
    },
    /// Other devices: tensors, updated with Candle ops ([`tensor_update`]).
    Tensors {
        m: Tensor,
        v: Tensor,
        master: Option<Tensor>,
    },
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
        Self::build(varmap, cfg, |var| var.device().is_cpu())
    }

    /// `host(var)`: whether that parameter's state lives in host memory (the one-pass update).
    fn build(varmap: &VarMap, cfg: AdamWConfig, host: impl Fn(&Var) -> bool) -> Result<Self> {
        let data = varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let params = names
            .into_iter()
            .map(|name| {
                let var = data[name].clone();
                let master = (var.dtype() != DType::F32)
                    .then(|| var.as_tensor().to_dtype(DType::F32))
                    .transpose()?;
                let state = if host(&var) {
                    let z = vec![0f32; var.elem_count()];
                    State::Host {
                        m: z.clone(),
                        v: z,
                        master: master.map(|t| t.flatten_all()?.to_vec1()).transpose()?,
                    }
                } else {
                    let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                    State::Tensors {
                        m: z.clone(),
                        v: z,
                        master,
                    }
                };
                Ok(Param {
                    name: name.clone(),
                    decay: decays(name, var.rank()),
                    var,
                    state,
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
            let g = g.detach().to_dtype(DType::F32)?;
            // Dividing by 1 would be a full copy (the embedding's gradient is the largest tensor).
            let g = if div == 1.0 { g } else { (g / div)? };
            let sum = match acc.remove(&p.name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(p.name.clone(), sum);
        }
        Ok(())
    }

    /// Global L2 norm of the gradients: on the CPU one parallel pass per gradient, no
    /// temporary (squares summed in f64 over a chunk split fixed by the size, so the same bits
    /// at any thread count); elsewhere Candle ops.
    pub fn grad_norm(grads: &Grads) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads.values() {
            sq += match with_host_f32(g, sum_squares)? {
                Some(s) => s,
                None => g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?,
            };
        }
        Ok(sq.sqrt())
    }

    /// One AdamW update with learning rate `lr`; gradients are first scaled by `grad_scale`
    /// (clipping and loss-scale removal). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let c = Coeffs::new(&self.cfg, self.t, lr, grad_scale);
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let decay = if p.decay { c.decay } else { 0.0 };
            match &mut p.state {
                State::Host { m, v, master } => {
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let done = with_host_f32(&g, |g| {
                        let op = OnePass {
                            c: &c,
                            keep: (1.0 - decay) as f32,
                            g: &g[..m.len()],
                            moments: Mutex::new((m, v)),
                            master: Mutex::new(master.as_deref_mut()),
                        };
                        p.var.as_tensor().inplace_op1(&op)
                    })?;
                    match done {
                        Some(r) => r?,
                        None => bail!("adamw: the gradient of `{}` is not on the cpu", p.name),
                    }
                }
                State::Tensors { m, v, master } => {
                    tensor_update(&c, decay, &p.var, g, (m, v, master))?;
                }
            }
        }
        Ok(())
    }

    /// The f32 parameters (master copies where they exist) by name: what checkpoints save.
    pub fn f32_params(&self) -> Result<BTreeMap<String, Tensor>> {
        self.params
            .iter()
            .map(|p| {
                let t = match &p.state {
                    State::Host {
                        master: Some(m), ..
                    } => Tensor::from_slice(m, p.var.shape(), p.var.device())?,
                    State::Tensors {
                        master: Some(m), ..
                    } => m.clone(),
                    _ => p.var.as_tensor().to_dtype(DType::F32)?,
                };
                Ok((p.name.clone(), t))
            })
            .collect()
    }

    /// Optimizer state: `exp_avg.NAME` and `exp_avg_sq.NAME`.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            let (m, v) = match &p.state {
                State::Host { m, v, .. } => {
                    let t = |x: &[f32]| Tensor::from_slice(x, p.var.shape(), p.var.device());
                    (t(m)?, t(v)?)
                }
                State::Tensors { m, v, .. } => (m.clone(), v.clone()),
            };
            out.insert(format!("exp_avg.{}", p.name), m);
            out.insert(format!("exp_avg_sq.{}", p.name), v);
        }
        Ok(out)
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
            let m = get(state, &format!("exp_avg.{}", p.name), "optimizer moment")?;
            let v = get(state, &format!("exp_avg_sq.{}", p.name), "optimizer moment")?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
            let mixed = p.var.dtype() != DType::F32;
            p.state = match p.state {
                State::Host { .. } => {
                    let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
                    State::Host {
                        m: host(&m)?,
                        v: host(&v)?,
                        master: mixed.then(|| host(&w)).transpose()?,
                    }
                }
                State::Tensors { .. } => State::Tensors {
                    m,
                    v,
                    master: mixed.then_some(w),
                },
            };
        }
        self.t = t;
        Ok(())
    }
}

/// The scalars of one update, in f32 exactly as Candle's `affine` rounds them.
struct Coeffs {
    /// `Some` when the gradients are scaled.
    grad_scale: Option<f32>,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    lr: f32,
    /// `lr · weight_decay`, in f64 (the `1 − decay` factor is rounded once, per parameter).
    decay: f64,
    /// The same scalars as f64, for [`tensor_update`].
    f64s: [f64; 7],
}

impl Coeffs {
    fn new(cfg: &AdamWConfig, t: u64, lr: f64, grad_scale: f64) -> Self {
        let bc1 = 1.0 - cfg.beta1.powi(t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(t as i32);
        Self {
            grad_scale: (grad_scale != 1.0).then_some(grad_scale as f32),
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: cfg.eps as f32,
            lr: lr as f32,
            decay: lr * cfg.weight_decay,
            f64s: [
                grad_scale,
                cfg.beta1,
                cfg.beta2,
                1.0 / bc1,
                1.0 / bc2,
                cfg.eps,
                lr,
            ],
        }
    }
}

/// Candle's `affine(mul, 0)` on one f32, bit for bit (`+ 0` turns `-0` into `+0`).
#[inline(always)]
fn scale(x: f32, mul: f32) -> f32 {
    x * mul + 0.0
}

/// One element of the update, the same operations in the same order as [`tensor_update`].
#[inline(always)]
fn update(c: &Coeffs, keep: f32, theta: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
    let g = match c.grad_scale {
        Some(s) => scale(g, s),
        None => g,
    };
    *m = scale(*m, c.beta1) + scale(g, c.one_minus_beta1);
    *v = scale(*v, c.beta2) + scale(g * g, c.one_minus_beta2);
    let u = scale(*m, c.inv_bc1) / (scale(*v, c.inv_bc2).sqrt() + c.eps);
    *theta = scale(*theta, keep) - scale(u, c.lr);
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// `f` of the elements of a contiguous f32 CPU tensor; `None` for any other tensor.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.dtype() != DType::F32 || !t.is_contiguous() {
        return Ok(None);
    }
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        return Ok(None);
    };
    Ok(Some(f(
        &s.as_slice::<f32>()?[l.start_offset()..][..l.shape().elem_count()]
    )))
}

/// `Σ x²` in f64, in parallel over [`CHUNK`]s, each summed in eight lanes (vectorised), the
/// chunk sums added in order.
fn sum_squares(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| {
            let mut lanes = [0f64; 8];
            let mut it = c.chunks_exact(8);
            for v in &mut it {
                for (a, &x) in lanes.iter_mut().zip(v) {
                    *a += x as f64 * x as f64;
                }
            }
            let tail: f64 = it.remainder().iter().map(|&x| x as f64 * x as f64).sum();
            lanes.iter().sum::<f64>() + tail
        })
        .collect();
    partial.iter().sum()
}

/// The one-pass CPU update of one parameter: theta (its storage, or its f32 master copy, which
/// is then rounded into the storage), both moments and nothing else are touched, in place, in
/// parallel over chunks; no temporary, no autograd graph.
struct OnePass<'a> {
    c: &'a Coeffs,
    /// `1 − lr · weight_decay` (1 for parameters without decay).
    keep: f32,
    g: &'a [f32],
    /// `InplaceOp1::cpu_fwd` takes `&self`: the moments and the master copy are lent through
    /// locks, taken once per parameter.
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    master: Mutex<Option<&'a mut [f32]>>,
}

/// Where a master-copy update is rounded to: the parameter's bf16/f16 storage.
struct Rounded<'a, T> {
    out: &'a mut [T],
    round: fn(f32) -> T,
}

impl<'a, T> Rounded<'a, T> {
    fn to(out: &'a mut [T], round: fn(f32) -> T) -> Self {
        Self { out, round }
    }
}

impl OnePass<'_> {
    /// `theta` in f32; with `out`, each updated chunk is also rounded into `out` by `round`.
    fn run<T: Send>(&self, theta: &mut [f32], out: Option<Rounded<'_, T>>) {
        let mut guard = self.moments.lock().expect("adamw moments");
        let (m, v) = &mut *guard;
        let (c, keep) = (self.c, self.keep);
        let step = |theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
            for i in 0..theta.len() {
                update(c, keep, &mut theta[i], &mut m[i], &mut v[i], g[i]);
            }
        };
        let chunks = theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK).zip(self.g.par_chunks(CHUNK)));
        match out {
            None => chunks.for_each(|((t, m), (v, g))| step(t, m, v, g)),
            Some(Rounded { out, round }) => {
                chunks
                    .zip(out.par_chunks_mut(CHUNK))
                    .for_each(|(((t, m), (v, g)), o)| {
                        step(t, m, v, g);
                        o.iter_mut().zip(t.iter()).for_each(|(o, &x)| *o = round(x));
                    })
            }
        }
    }
}

impl InplaceOp1 for OnePass<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let n = self.g.len();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw: the parameter is not contiguous")
        };
        let mut master = self.master.lock().expect("adamw master");
        match (storage, master.take()) {
            (CpuStorage::F32(w), None) => self.run::<f32>(&mut w[start..end][..n], None),
            (CpuStorage::BF16(w), Some(theta)) => {
                let out = &mut w[start..end][..n];
                self.run(theta, Some(Rounded::to(out, bf16::from_f32)))
            }
            (CpuStorage::F16(w), Some(theta)) => {
                let out = &mut w[start..end][..n];
                self.run(theta, Some(Rounded::to(out, f16::from_f32)))
            }
            (s, _) => candle_core::bail!(
                "adamw: a {:?} parameter needs an f32 master copy exactly when it is not f32",
                s.dtype()
            ),
        }
        Ok(())
    }
}

/// The update through Candle's ops (devices other than the CPU); [`update`] is its one-pass
/// form, bit for bit.
fn tensor_update(
    c: &Coeffs,
    decay: f64,
    var: &Var,
    g: &Tensor,
    (m, v, master): (&mut Tensor, &mut Tensor, &mut Option<Tensor>),
) -> Result<()> {
    let [grad_scale, beta1, beta2, inv_bc1, inv_bc2, eps, lr] = c.f64s;
    let g = if grad_scale != 1.0 {
        g.affine(grad_scale, 0.0)?
    } else {
        g.clone()
    };
    *m = (m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?.detach();
    *v = (v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?.detach();
    let update = (m.affine(inv_bc1, 0.0)? / (v.affine(inv_bc2, 0.0)?.sqrt()? + eps)?)?;
    let theta = match master {
        Some(m) => m.clone(),
        None => var.as_tensor().clone(),
    };
    let new = (theta.affine(1.0 - decay, 0.0)? - update.affine(lr, 0.0)?)?.detach();
    match master {
        Some(m) => {
            var.set(&new.to_dtype(var.dtype())?)?;
            *m = new;
        }
        None => var.set(&new)?,
    }
    Ok(())
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
    use flash_test_support::f32_bits;

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

    /// The one-pass norm against the f64 formula, on random gradients: sizes of one element, a
    /// few, several chunks, and a transposed (strided) one that takes the Candle-op path.
    #[test]
    fn grad_norm_matches_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let normal = Normal::new(0f32, 1.0).unwrap();
        let mut grads = Grads::new();
        let mut want = 0f64;
        for (i, n) in [1usize, 7, 3 * CHUNK + 5, 6 * 35].into_iter().enumerate() {
            let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            want += v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
            let t = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
            let t = if i == 3 {
                t.reshape((6, 35)).unwrap().t().unwrap()
            } else {
                t
            };
            grads.insert(format!("g{i}"), t);
        }
        let got = AdamW::grad_norm(&grads).unwrap();
        assert!(
            (got - want.sqrt()).abs() <= 1e-6 * want.sqrt(),
            "{got} vs {}",
            want.sqrt()
        );
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
        assert!(opt.state().unwrap().values().all(|t| !t.track_op()));
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

    /// Random gradients with some exact zeros and negative zeros.
    fn grads_for(vm: &VarMap, seed: u64) -> Grads {
        let data = vm.data().lock().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0f32, 1.0).unwrap();
        data.iter()
            .map(|(name, var)| {
                let g: Vec<f32> = (0..var.elem_count())
                    .map(|i| match i % 97 {
                        0 => 0.0,
                        1 => -0.0,
                        _ => normal.sample(&mut rng) * 1e-2,
                    })
                    .collect();
                let g = Tensor::from_vec(g, var.shape(), var.device()).unwrap();
                (name.clone(), g)
            })
            .collect()
    }

    /// The one-pass in-place update gives the very bits of the Candle-op update, for f32
    /// parameters and for bf16/f16 ones with f32 master copies, with and without decay and
    /// gradient scaling, over several steps; parameters span several parallel chunks.
    #[test]
    fn one_pass_update_is_bit_identical_to_the_tensor_ops() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let make = || {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
                vb.get((3, CHUNK + 1000), "h.0.mlp.c_fc.weight").unwrap();
                vb.get(70, "h.0.mlp.c_fc.bias").unwrap();
                vb.get((40, 9), "wte.weight").unwrap();
                init_params(&vm, 3, 1, true).unwrap();
                vm
            };
            let cfg = AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            };
            let (vm_a, vm_b) = (make(), make());
            let mut host = AdamW::new(&vm_a, cfg).unwrap();
            let mut ops = AdamW::build(&vm_b, cfg, |_| false).unwrap();
            assert!(host
                .params
                .iter()
                .all(|p| matches!(p.state, State::Host { .. })));
            for (step, (lr, scale)) in [(1e-3, 1.0), (3e-3, 0.37), (2e-4, 1.0), (1e-3, 2.5)]
                .into_iter()
                .enumerate()
            {
                let g = grads_for(&vm_a, step as u64);
                host.step(&g, lr, scale).unwrap();
                ops.step(&g, lr, scale).unwrap();
            }
            let pairs = [
                (host.f32_params().unwrap(), ops.f32_params().unwrap()),
                (host.state().unwrap(), ops.state().unwrap()),
            ];
            for (a, b) in pairs {
                assert_eq!(a.len(), b.len());
                for (name, t) in &a {
                    assert!(
                        f32_bits(t) == f32_bits(&b[name]),
                        "{dtype:?} {name} differs"
                    );
                }
            }
            let (da, db) = (vm_a.data().lock().unwrap(), vm_b.data().lock().unwrap());
            for (name, var) in da.iter() {
                let same = f32_bits(var.as_tensor()) == f32_bits(db[name].as_tensor());
                assert!(same, "{dtype:?} parameter {name} differs");
            }
        }
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
