//! BERT (Devlin et al., 2019): post-norm encoder with learned absolute positions and token types,
//! plus Hugging Face's heads. Parameter names are those of `BertModel`, `BertForMaskedLM` and
//! `BertForSequenceClassification`.
//!
//! Padding: a batch is right-padded and described by the valid length of each row. Attention
//! gets it as the op's per-sequence key lengths (no `N×N` mask tensor), which is exactly
//! Hugging Face's additive key-padding mask: padded keys get zero weight, and padded query rows
//! are still computed (attending to the valid keys), so every position's output matches.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use flash_ops::AttnOptions;

use super::config::BertConfig;
use crate::activation::Activation;
use crate::attention::{AttentionKind, MaskCache};
use crate::dropout::{DropoutCtx, SeedCounter};
use crate::layer_norm::LayerNorm;
use crate::linear::Linear;
use crate::loss::{linear_cross_entropy, CeOptions};

// Dropout sites of one forward: 0 is the embedding, three per layer, then the heads.
fn site(layer: usize, which: u64) -> u64 {
    1 + 3 * layer as u64 + which
}
const ATTN_PROBS: u64 = 0;
const ATTN_OUT: u64 = 1;
const FFN_OUT: u64 = 2;
const CLASSIFIER_SITE: u64 = u64::MAX - 1;

/// A right-padded batch: `input_ids (b, t)` whose row `i` holds `lengths[i]` real tokens, and
/// optional `token_type_ids (b, t)` (default: all zeros).
#[derive(Debug, Clone, Copy)]
pub struct BertInput<'a> {
    pub input_ids: &'a Tensor,
    pub token_type_ids: Option<&'a Tensor>,
    pub lengths: &'a [usize],
}

impl<'a> BertInput<'a> {
    /// A batch of one segment (all token types zero).
    pub fn new(input_ids: &'a Tensor, lengths: &'a [usize]) -> Self {
        Self {
            input_ids,
            token_type_ids: None,
            lengths,
        }
    }

    pub fn with_token_types(self, token_type_ids: &'a Tensor) -> Self {
        Self {
            token_type_ids: Some(token_type_ids),
            ..self
        }
    }
}

#[derive(Debug, Clone)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    layer_norm: LayerNorm,
    dropout: f32,
}

impl Embeddings {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let init = Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let h = cfg.hidden_size;
        Ok(Self {
            word: vb.get_with_hints((cfg.vocab_size, h), "word_embeddings.weight", init)?,
            position: vb.get_with_hints(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
                init,
            )?,
            token_type: vb.get_with_hints(
                (cfg.type_vocab_size, h),
                "token_type_embeddings.weight",
                init,
            )?,
            layer_norm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        ctx: &DropoutCtx,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.word.dim(1)?;
        let lookup = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
            table
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, h))
        };
        let mut x = lookup(&self.word, input_ids)?;
        x = x.broadcast_add(&self.position.narrow(0, 0, t)?.unsqueeze(0)?)?;
        x = match token_type_ids {
            Some(tt) => (x + lookup(&self.token_type, tt)?)?,
            // All-zero token types: row 0 broadcast (its gradient is still the sum over tokens).
            None => x.broadcast_add(&self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?)?,
        };
        ctx.apply(&self.layer_norm.forward(&x)?, self.dropout, 0)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_ln: LayerNorm,
    act: Activation,
    heads: usize,
    attn_dropout: f32,
    hidden_dropout: f32,
}

impl Layer {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let (h, std, eps) = (cfg.hidden_size, cfg.initializer_range, cfg.layer_norm_eps);
        let inter = cfg.intermediate_size;
        let sa = vb.pp("attention").pp("self");
        let ao = vb.pp("attention").pp("output");
        Ok(Self {
            query: Linear::new(h, h, true, std, sa.pp("query"))?,
            key: Linear::new(h, h, true, std, sa.pp("key"))?,
            value: Linear::new(h, h, true, std, sa.pp("value"))?,
            attn_out: Linear::new(h, h, true, std, ao.pp("dense"))?,
            attn_ln: LayerNorm::new(h, eps, ao.pp("LayerNorm"))?,
            intermediate: Linear::new(h, inter, true, std, vb.pp("intermediate").pp("dense"))?,
            output: Linear::new(inter, h, true, std, vb.pp("output").pp("dense"))?,
            output_ln: LayerNorm::new(h, eps, vb.pp("output").pp("LayerNorm"))?,
            act: cfg.hidden_act,
            heads: cfg.num_attention_heads,
            attn_dropout: cfg.attention_probs_dropout_prob,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        opts: &AttnOptions,
        layer: usize,
        attn: AttentionKind,
        ctx: &DropoutCtx,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let d = c / self.heads;
        let split = |l: &Linear| l.forward(x)?.reshape((b, t, self.heads, d));
        let (q, k, v) = (split(&self.query)?, split(&self.key)?, split(&self.value)?);
        let mut opts = opts.clone();
        if ctx.active(self.attn_dropout) {
            opts = opts.dropout(self.attn_dropout, ctx.site_seed(site(layer, ATTN_PROBS)));
        }
        let a = attn.attend(&q, &k, &v, opts)?.reshape((b, t, c))?;
        let a = ctx.apply(
            &self.attn_out.forward(&a)?,
            self.hidden_dropout,
            site(layer, ATTN_OUT),
        )?;
        let x = self.attn_ln.forward(&(a + x)?)?;
        let f = self.act.forward(&self.intermediate.forward(&x)?)?;
        let f = ctx.apply(
            &self.output.forward(&f)?,
            self.hidden_dropout,
            site(layer, FFN_OUT),
        )?;
        self.output_ln.forward(&(f + x)?)
    }
}

/// The BERT encoder (`BertModel`): embeddings, layers and, optionally, the pooler. Its parameters
/// sit directly under `vb` (`embeddings.*`, `encoder.layer.*`, `pooler.*`); the task models put
/// it under `bert.`.
#[derive(Debug)]
pub struct BertModel {
    cfg: BertConfig,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    attn: AttentionKind,
    seeds: SeedCounter,
    masks: MaskCache,
}

impl BertModel {
    pub fn new(
        cfg: &BertConfig,
        vb: VarBuilder,
        attn: AttentionKind,
        add_pooler: bool,
    ) -> Result<Self> {
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!(
                "bert: hidden_size {} must be a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        if cfg.position_embedding_type != "absolute" {
            bail!(
                "bert: position_embedding_type `{}` is not supported (only `absolute`)",
                cfg.position_embedding_type
            )
        }
        let enc = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, enc.pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let pooler = add_pooler
            .then(|| {
                let h = cfg.hidden_size;
                Linear::new(
                    h,
                    h,
                    true,
                    cfg.initializer_range,
                    vb.pp("pooler").pp("dense"),
                )
            })
            .transpose()?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings: Embeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            pooler,
            attn,
            seeds: SeedCounter::new(0),
            masks: MaskCache::new(
                cfg.sparsity,
                cfg.num_attention_heads,
                false,
                cfg.max_position_embeddings,
            )?,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn attention(&self) -> AttentionKind {
        self.attn
    }

    pub fn set_attention(&mut self, attn: AttentionKind) {
        self.attn = attn
    }

    /// Restarts the dropout seed sequence: training forwards after this are reproducible.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.seeds.set(seed)
    }

    pub fn dtype(&self) -> DType {
        self.embeddings.word.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embeddings.word.device()
    }

    /// Last hidden states `(b, t, hidden)` of a batch.
    pub fn forward(&self, input: BertInput<'_>, train: bool) -> Result<Tensor> {
        let ctx = self.seeds.ctx(train);
        self.forward_ctx(input, &ctx)
    }

    /// The pooler output `tanh(W·h[CLS] + b)`, `(b, hidden)`.
    pub fn pool(&self, sequence_output: &Tensor) -> Result<Tensor> {
        let Some(pooler) = &self.pooler else {
            bail!("bert: this model was built without a pooler")
        };
        pooler
            .forward(&sequence_output.narrow(1, 0, 1)?.squeeze(1)?)?
            .tanh()
    }

    fn forward_ctx(&self, input: BertInput<'_>, ctx: &DropoutCtx) -> Result<Tensor> {
        let BertInput {
            input_ids,
            token_type_ids,
            lengths,
        } = input;
        let (b, t) = input_ids.dims2()?;
        if lengths.len() != b {
            bail!("bert: {} lengths for a batch of {b}", lengths.len())
        }
        if let Some(&l) = lengths.iter().find(|&&l| l > t) {
            bail!("bert: length {l} exceeds the padded length {t}")
        }
        if t > self.cfg.max_position_embeddings {
            bail!(
                "bert: {t} tokens exceed max_position_embeddings = {}",
                self.cfg.max_position_embeddings
            )
        }
        // Unpadded batches skip the key-length mask altogether; a block mask restricts the rest.
        let mut opts = self.masks.apply(AttnOptions::new(), t, t)?;
        if lengths.iter().any(|&l| l < t) {
            opts = opts.key_lengths(lengths.to_vec());
        }
        let mut x = self.embeddings.forward(input_ids, token_type_ids, ctx)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &opts, i, self.attn, ctx)?;
        }
        Ok(x)
    }
}

/// `BertForMaskedLM`: the encoder (no pooler) under `bert.` and the prediction head under
/// `cls.predictions.`, whose decoder is tied to the word embeddings.
#[derive(Debug)]
pub struct BertForMaskedLM {
    bert: BertModel,
    transform: Linear,
    transform_ln: LayerNorm,
    act: Activation,
    bias: Tensor,
}

impl BertForMaskedLM {
    pub fn new(cfg: &BertConfig, vb: VarBuilder, attn: AttentionKind) -> Result<Self> {
        let bert = BertModel::new(cfg, vb.pp("bert"), attn, false)?;
        let p = vb.pp("cls").pp("predictions");
        let h = cfg.hidden_size;
        Ok(Self {
            bert,
            transform: Linear::new(h, h, true, cfg.initializer_range, p.pp("transform.dense"))?,
            transform_ln: LayerNorm::new(h, cfg.layer_norm_eps, p.pp("transform.LayerNorm"))?,
            act: cfg.hidden_act,
            bias: p.get_with_hints(cfg.vocab_size, "bias", Init::Const(0.0))?,
        })
    }

    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    pub fn bert_mut(&mut self) -> &mut BertModel {
        &mut self.bert
    }

    pub fn config(&self) -> &BertConfig {
        self.bert.config()
    }

    pub fn set_attention(&mut self, attn: AttentionKind) {
        self.bert.set_attention(attn)
    }

    pub fn set_dropout_seed(&self, seed: u64) {
        self.bert.set_dropout_seed(seed)
    }

    /// MLM logits `(b, t, vocab)` of one-segment `input_ids (b, t)`, row `i` holding
    /// `lengths[i]` real tokens ([`BertInput::new`]).
    pub fn forward(&self, input_ids: &Tensor, lengths: &[usize], train: bool) -> Result<Tensor> {
        self.forward_with_token_types(BertInput::new(input_ids, lengths), train)
    }

    /// MLM logits `(b, t, vocab)` of a batch that may carry token types.
    pub fn forward_with_token_types(&self, input: BertInput<'_>, train: bool) -> Result<Tensor> {
        let h = self.transformed(input, train)?;
        let (b, t, c) = h.dims3()?;
        let vocab = self.bias.dim(0)?;
        h.reshape((b * t, c))?
            .matmul(&self.bert.embeddings.word.t()?)?
            .broadcast_add(&self.bias)?
            .reshape((b, t, vocab))
    }

    /// Mean masked-LM cross-entropy at `positions (m)` (u32 flat indices into `b·t`) against
    /// their original ids `labels (m)`, through the fused decoder ([`linear_cross_entropy`] with
    /// the word embeddings and `bias`): only the masked rows reach the head, and their logits
    /// never exist. `labels` may hold `ignore_index` for rows that do not count. `train`: dropout
    /// on and the loss differentiable; otherwise evaluation, with no gradient work.
    pub fn masked_lm_loss(
        &self,
        input: BertInput<'_>,
        (positions, labels): (&Tensor, &Tensor),
        ignore_index: Option<u32>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.transformed(input, train)?;
        let (b, t, c) = h.dims3()?;
        let h = h.reshape((b * t, c))?.index_select(positions, 0)?;
        let (w, bias) = (&self.bert.embeddings.word, &self.bias);
        let (h, w, bias) = if train {
            (h, w.clone(), bias.clone())
        } else {
            (h.detach(), w.detach(), bias.detach())
        };
        let opts = CeOptions {
            ignore_index,
            ..CeOptions::default()
        };
        linear_cross_entropy(&h, &w, Some(&bias), labels, &opts)
    }

    /// The prediction head's transform of the encoder output, `(b, t, hidden)`.
    fn transformed(&self, input: BertInput<'_>, train: bool) -> Result<Tensor> {
        let h = self.bert.forward(input, train)?;
        let h = self.act.forward(&self.transform.forward(&h)?)?;
        self.transform_ln.forward(&h)
    }
}

/// `BertForSequenceClassification`: encoder with pooler under `bert.`, dropout, `classifier`.
#[derive(Debug)]
pub struct BertForSequenceClassification {
    bert: BertModel,
    classifier: Linear,
    dropout: f32,
}

impl BertForSequenceClassification {
    pub fn new(cfg: &BertConfig, vb: VarBuilder, attn: AttentionKind) -> Result<Self> {
        let bert = BertModel::new(cfg, vb.pp("bert"), attn, true)?;
        let classifier = Linear::new(
            cfg.hidden_size,
            cfg.num_labels(),
            true,
            cfg.initializer_range,
            vb.pp("classifier"),
        )?;
        Ok(Self {
            bert,
            classifier,
            dropout: cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob),
        })
    }

    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    pub fn set_attention(&mut self, attn: AttentionKind) {
        self.bert.set_attention(attn)
    }

    pub fn set_dropout_seed(&self, seed: u64) {
        self.bert.set_dropout_seed(seed)
    }

    /// Class logits `(b, num_labels)`.
    pub fn forward(&self, input: BertInput<'_>, train: bool) -> Result<Tensor> {
        let ctx = self.bert.seeds.ctx(train);
        let h = self.bert.forward_ctx(input, &ctx)?;
        let pooled = ctx.apply(&self.bert.pool(&h)?, self.dropout, CLASSIFIER_SITE)?;
        self.classifier.forward(&pooled)
    }
}
