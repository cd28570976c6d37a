//! GPT-2 (Radford et al., 2019) as `GPT2LMHeadModel`: pre-norm decoder blocks, learned positions,
//! LM head tied to the token embedding. Parameter names and layouts are Hugging Face's.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use flash_ops::AttnOptions;

use super::config::Gpt2Config;
use super::shared_cache::{retain_rows, LayerCache, SharedPrefixCache};
use crate::activation::Activation;
use crate::attention::{AttentionKind, MaskCache};
use crate::dropout::{DropoutCtx, SeedCounter};
use crate::embedding::{embed, TiedGrad};
use crate::layer_norm::LayerNorm;
use crate::linear::Linear;
use crate::loss::{linear_cross_entropy_tied, CeOptions};

/// Keys and values of every layer for incremental decoding, `(b, len, heads, head_dim)` each.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Buffers `(b, capacity, h, d)` that `layers` are leading views of, written in place.
    reserved: Vec<Option<(Tensor, Tensor)>>,
    split_kv: bool,
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(1).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.reserved.clear()
    }

    /// Single-token steps attend with flash decoding (the key axis split into chunks on parallel
    /// threads, merged by log-sum-exp) instead of the model's attention kind.
    pub fn with_flash_decoding(mut self, on: bool) -> Self {
        self.split_kv = on;
        self
    }

    /// `n` physical copies of a batch-1 cache with room for `extra` more positions: per-sequence
    /// caches each holding the prompt, the layout batched decoding without prefix sharing uses.
    /// Appends within the room write in place (no copy of the cache per step, as a serving
    /// engine's preallocated cache); past it they fall back to concatenation. Clones share the
    /// room: append to one of them only.
    pub fn repeat(&self, n: usize, extra: usize) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut reserved = Vec::with_capacity(self.layers.len());
        let grow = |t: &Tensor| -> Result<Tensor> {
            if t.dim(0)? != 1 {
                bail!(
                    "KvCache::repeat: the cache must hold one sequence, got {}",
                    t.dim(0)?
                )
            }
            let (_, _, h, d) = t.dims4()?;
            let room = Tensor::zeros((n, extra, h, d), t.dtype(), t.device())?;
            Tensor::cat(&[&t.repeat((n, 1, 1, 1))?, &room], 1)
        };
        for l in &self.layers {
            match l {
                Some((k, v)) => {
                    let (bk, bv) = (grow(k)?, grow(v)?);
                    let len = k.dim(1)?;
                    layers.push(Some((bk.narrow(1, 0, len)?, bv.narrow(1, 0, len)?)));
                    reserved.push(Some((bk, bv)));
                }
                None => {
                    layers.push(None);
                    reserved.push(None);
                }
            }
        }
        Ok(KvCache {
            layers,
            reserved,
            split_kv: self.split_kv,
        })
    }

    /// Keeps the sequences at `rows` (in that order).
    pub fn retain(&mut self, rows: &[usize]) -> Result<()> {
        let len = self.len();
        if self.reserved.iter().any(Option::is_some) {
            retain_rows(&mut self.reserved, rows)?;
            for (l, r) in self.layers.iter_mut().zip(&self.reserved) {
                if let Some((bk, bv)) = r {
                    *l = Some((bk.narrow(1, 0, len)?, bv.narrow(1, 0, len)?));
                }
            }
            Ok(())
        } else {
            retain_rows(&mut self.layers, rows)
        }
    }

    pub(crate) fn into_layers(self) -> Vec<Option<(Tensor, Tensor)>> {
        self.layers
    }
}

/// The cache one forward pass decodes with.
enum CacheMut<'a> {
    Dense(&'a mut KvCache),
    Shared(&'a mut SharedPrefixCache),
}

impl CacheMut<'_> {
    fn len(&self) -> usize {
        match self {
            CacheMut::Dense(c) => c.len(),
            CacheMut::Shared(c) => c.len(),
        }
    }

    fn layers(&mut self, n: usize) -> Vec<LayerCache<'_>> {
        match self {
            CacheMut::Dense(c) => {
                c.layers.resize(n, None);
                c.reserved.resize(n, None);
                let split_kv = c.split_kv;
                c.layers
                    .iter_mut()
                    .zip(c.reserved.iter_mut())
                    .map(|(kv, reserved)| LayerCache::Dense {
                        kv,
                        reserved,
                        split_kv,
                    })
                    .collect()
            }
            CacheMut::Shared(c) => c.layers().collect(),
        }
    }
}

// Dropout sites within one forward pass: 0 is the embedding, then three per layer.
fn site(layer: usize, which: u64) -> u64 {
    1 + 3 * layer as u64 + which
}
const ATTN_PROBS: u64 = 0;
const ATTN_RESID: u64 = 1;
const MLP_RESID: u64 = 2;

/// GPT-2 §2.3: the projections into the residual stream start at the initialiser's std scaled
/// by 1/sqrt(number of residual layers), two per block.
fn residual_proj_std(cfg: &Gpt2Config) -> f64 {
    cfg.initializer_range / (2.0 * cfg.n_layer as f64).sqrt()
}

/// `residual + dropout(proj(y))`, the end of both sublayers (dropout seeded by `site`); without
/// dropout the residual joins the projection's bias pass.
fn into_residual(
    proj: &Linear,
    y: &Tensor,
    residual: &Tensor,
    pdrop: f32,
    ctx: &DropoutCtx,
    site: u64,
) -> Result<Tensor> {
    if !ctx.active(pdrop) {
        return proj.forward_residual(y, residual);
    }
    residual + ctx.apply(&proj.forward(y)?, pdrop, site)?
}

#[derive(Debug, Clone)]
struct SelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    attn_pdrop: f32,
    resid_pdrop: f32,
}

impl SelfAttention {
    fn new(cfg: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_attn: Linear::conv1d(c, 3 * c, cfg.initializer_range, vb.pp("c_attn"))?,
            c_proj: Linear::conv1d(c, c, residual_proj_std(cfg), vb.pp("c_proj"))?,
            n_head: cfg.n_head,
            attn_pdrop: cfg.attn_pdrop,
            resid_pdrop: cfg.resid_pdrop,
        })
    }

    /// `residual + attn(x)` ([`into_residual`]). `x` is the normalised input, `residual` the stream the output is added to (in one pass).
    fn forward(
        &self,
        (x, residual): (&Tensor, &Tensor),
        layer: usize,
        attn: AttentionKind,
        ctx: &DropoutCtx,
        (masks, past): (&MaskCache, usize),
        cache: Option<LayerCache<'_>>,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let d = c / self.n_head;
        // (b, t, 3, h, d): q, k, v already in the flash layout, no transpose.
        let qkv = self.c_attn.forward(x)?.reshape((b, t, 3, self.n_head, d))?;
        let q = qkv.narrow(2, 0, 1)?.squeeze(2)?;
        let k = qkv.narrow(2, 1, 1)?.squeeze(2)?;
        let v = qkv.narrow(2, 2, 1)?.squeeze(2)?;
        // Causal with the diagonal aligned bottom-right, so cached keys are all visible.
        // The block mask (if any) further restricts it: `past` cached keys precede the `t` queries.
        let mut opts = masks.apply(AttnOptions::new().causal(true), t, past + t)?;
        if ctx.active(self.attn_pdrop) {
            opts = opts.dropout(self.attn_pdrop, ctx.site_seed(site(layer, ATTN_PROBS)));
        }
        let y = match cache {
            Some(cache) => cache.attend(attn, &q, k, v, opts)?,
            None => attn.attend(&q, &k, &v, opts)?,
        };
        let y = y.reshape((b, t, c))?;
        into_residual(
            &self.c_proj,
            &y,
            residual,
            self.resid_pdrop,
            ctx,
            site(layer, ATTN_RESID),
        )
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
    resid_pdrop: f32,
}

impl Mlp {
    fn new(cfg: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let (c, inner) = (cfg.n_embd, cfg.inner_dim());
        Ok(Self {
            c_fc: Linear::conv1d(c, inner, cfg.initializer_range, vb.pp("c_fc"))?,
            c_proj: Linear::conv1d(inner, c, residual_proj_std(cfg), vb.pp("c_proj"))?,
            act: cfg.activation_function,
            resid_pdrop: cfg.resid_pdrop,
        })
    }

    /// `residual + mlp(x)` ([`into_residual`]).
    fn forward(
        &self,
        x: &Tensor,
        residual: &Tensor,
        layer: usize,
        ctx: &DropoutCtx,
    ) -> Result<Tensor> {
        let h = self.c_fc.forward_activation(x, self.act)?;
        into_residual(
            &self.c_proj,
            &h,
            residual,
            self.resid_pdrop,
            ctx,
            site(layer, MLP_RESID),
        )
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            ln_1: LayerNorm::new(cfg.n_embd, eps, vb.pp("ln_1"))?,
            attn: SelfAttention::new(cfg, vb.pp("attn"))?,
            ln_2: LayerNorm::new(cfg.n_embd, eps, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

/// GPT-2 language model (`GPT2LMHeadModel`). Parameters are created in (or read from) the
/// `VarBuilder` under `transformer.*`; the LM head is `wte` itself.
#[derive(Debug)]
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    attn: AttentionKind,
    seeds: SeedCounter,
    masks: MaskCache,
}

impl Gpt2 {
    /// Builds the model; with `VarBuilder::from_varmap` its parameters are created in the
    /// `VarMap` (HF initialisation) under their Hugging Face names.
    pub fn new(cfg: &Gpt2Config, vb: VarBuilder, attn: AttentionKind) -> Result<Self> {
        if cfg.n_head == 0 || cfg.n_embd % cfg.n_head != 0 {
            bail!(
                "gpt2: n_embd {} must be a multiple of n_head {}",
                cfg.n_embd,
                cfg.n_head
            )
        }
        let vb = vb.pp("transformer");
        let init = Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let wte = vb.get_with_hints((cfg.vocab_size, cfg.n_embd), "wte.weight", init)?;
        let wpe = vb.get_with_hints((cfg.n_positions, cfg.n_embd), "wpe.weight", init)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, vb.pp(format!("h.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(cfg.n_embd, cfg.layer_norm_epsilon, vb.pp("ln_f"))?;
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            attn,
            seeds: SeedCounter::new(0),
            masks: MaskCache::new(cfg.sparsity, cfg.n_head, true, cfg.n_positions)?,
        })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    pub fn attention(&self) -> AttentionKind {
        self.attn
    }

    pub fn set_attention(&mut self, attn: AttentionKind) {
        self.attn = attn
    }

    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// Restarts the dropout seed sequence: training forwards after this are reproducible.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.seeds.set(seed)
    }

    /// Logits `(b, t, vocab)` for `input_ids (b, t)` (u32). `train` turns dropout on, with a
    /// fresh seed per call.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let ctx = self.seeds.ctx(train);
        let h = self.hidden(input_ids, &ctx, None)?;
        self.lm_head(&h)
    }

    /// Eval-mode logits for the new tokens `input_ids (b, t)`, attending to everything in
    /// `cache` and appending these tokens' keys and values to it.
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden(input_ids, &DropoutCtx::eval(), Some(CacheMut::Dense(cache)))?;
        self.lm_head(&h)
    }

    /// As [`forward_with_cache`](Self::forward_with_cache), returning the logits of the last
    /// position only, `(b, 1, vocab)`: a long prompt's `(t × vocab)` logits are never formed.
    pub fn prefill(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden(input_ids, &DropoutCtx::eval(), Some(CacheMut::Dense(cache)))?;
        let t = h.dim(1)?;
        self.lm_head(&h.narrow(1, t - 1, 1)?)
    }

    /// As [`forward_with_cache`](Self::forward_with_cache) for `n` samples of one prompt:
    /// `input_ids (n, t)` are each sample's new tokens; attention reads the prompt's K/V once for
    /// all of them and appends the new K/V to each sample's suffix.
    pub fn forward_with_shared_cache(
        &self,
        input_ids: &Tensor,
        cache: &mut SharedPrefixCache,
    ) -> Result<Tensor> {
        let h = self.hidden(
            input_ids,
            &DropoutCtx::eval(),
            Some(CacheMut::Shared(cache)),
        )?;
        self.lm_head(&h)
    }

    /// Mean next-token cross-entropy of `input_ids (b, t)` against `targets (b, t)` (u32), through
    /// the fused LM head ([`linear_cross_entropy`](crate::linear_cross_entropy) with `wte`): the `(b·t × vocab)` logits never
    /// exist. `train`: dropout on, and the loss is differentiable (the head's gradients are
    /// computed in the same pass); otherwise evaluation: no dropout, no gradient work.
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        if targets.dims() != input_ids.dims() {
            bail!(
                "gpt2: `targets` must have the shape of input_ids {:?}, got {:?}",
                input_ids.dims(),
                targets.dims()
            )
        }
        // wte's two uses get one gradient buffer: the head's, handed to the embedding.
        let tied = TiedGrad::default();
        let h = self.hidden_tied(input_ids, &self.seeds.ctx(train), None, Some(&tied))?;
        let (b, t, c) = h.dims3()?;
        let h = h.reshape((b * t, c))?;
        let (h, w) = if train {
            (h, self.wte.clone())
        } else {
            (h.detach(), self.wte.detach())
        };
        let (targets, opts) = (targets.flatten_all()?, CeOptions::default());
        linear_cross_entropy_tied(&h, &w, None, &targets, &opts, Some(&tied))
    }

    /// Final hidden states `(b, t, n_embd)` (after `ln_f`).
    pub fn forward_hidden(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let ctx = self.seeds.ctx(train);
        self.hidden(input_ids, &ctx, None)
    }

    fn hidden(
        &self,
        input_ids: &Tensor,
        ctx: &DropoutCtx,
        cache: Option<CacheMut<'_>>,
    ) -> Result<Tensor> {
        self.hidden_tied(input_ids, ctx, cache, None)
    }

    /// [`hidden`](Self::hidden); with `tied`, wte's gradient starts from the LM head's.
    fn hidden_tied(
        &self,
        input_ids: &Tensor,
        ctx: &DropoutCtx,
        mut cache: Option<CacheMut<'_>>,
        tied: Option<&TiedGrad>,
    ) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + t > self.cfg.n_positions {
            bail!(
                "gpt2: {} positions exceed the context length n_positions = {}",
                past + t,
                self.cfg.n_positions
            )
        }
        let pos = self.wpe.narrow(0, past, t)?;
        let x = embed(&self.wte, &pos, input_ids, tied)?;
        let mut h = ctx.apply(&x, self.cfg.embd_pdrop, 0)?;
        let mut slots = cache
            .as_mut()
            .map(|c| c.layers(self.blocks.len()).into_iter());
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = slots.as_mut().and_then(|s| s.next());
            let x = block.ln_1.forward(&h)?;
            h = block
                .attn
                .forward((&x, &h), i, self.attn, ctx, (&self.masks, past), slot)?;
            h = block.mlp.forward(&block.ln_2.forward(&h)?, &h, i, ctx)?;
        }
        self.ln_f.forward(&h)
    }

    /// Tied LM head: `h · wteᵀ`.
    fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, c) = h.dims3()?;
        h.reshape((b * t, c))?
            .matmul(&self.wte.t()?)?
            .reshape((b, t, self.cfg.vocab_size))
    }
}
