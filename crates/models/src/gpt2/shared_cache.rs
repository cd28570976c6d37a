//! The KV cache of batched decoding with a shared prompt: the prompt's keys and values once per
//! layer, `(1, sp, h, d)`, and a suffix per sample, `(n, s, h, d)`, that grows by one position a
//! step. Memory is `sp + n·s` positions per layer instead of the `n·(sp + s)` of per-sequence
//! caches.

use candle_core::{bail, Result, Tensor};

use super::decode::{flash_decoding, kv_chunks, shared_prefix_decode};
use super::model::KvCache;
use crate::attention::AttentionKind;
use flash_ops::AttnOptions;

/// A shared prompt's K/V plus every sample's own continuation, for
/// [`Gpt2::forward_with_shared_cache`](super::Gpt2::forward_with_shared_cache).
#[derive(Debug, Clone)]
pub struct SharedPrefixCache {
    prefix: Vec<(Tensor, Tensor)>,
    suffix: Vec<Option<(Tensor, Tensor)>>,
}

impl SharedPrefixCache {
    /// Takes the cache of one prefilled prompt (batch 1) as the shared prefix.
    pub fn from_prefix(cache: KvCache) -> Result<Self> {
        let prefix = cache
            .into_layers()
            .into_iter()
            .map(|l| match l {
                // Own storage: the prefill's K/V are views into its fused qkv projection.
                Some((k, v)) if k.dim(0)? == 1 => Ok((k.contiguous()?, v.contiguous()?)),
                Some((k, _)) => bail!(
                    "SharedPrefixCache: the prefix must be one sequence, got a cache of batch {}",
                    k.dim(0)?
                ),
                None => {
                    bail!("SharedPrefixCache: the prefix cache is empty (prefill a prompt first)")
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if prefix.is_empty() {
            bail!("SharedPrefixCache: the prefix cache is empty (prefill a prompt first)")
        }
        let suffix = vec![None; prefix.len()];
        Ok(Self { prefix, suffix })
    }

    /// Positions of the shared prompt.
    pub fn prefix_len(&self) -> usize {
        self.prefix[0].0.dim(1).unwrap_or(0)
    }

    /// Positions each sample has added after the prompt.
    pub fn suffix_len(&self) -> usize {
        match &self.suffix[0] {
            Some((k, _)) => k.dim(1).unwrap_or(0),
            None => 0,
        }
    }

    /// Positions every sample sees: prompt plus its own suffix.
    pub fn len(&self) -> usize {
        self.prefix_len() + self.suffix_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples the suffix holds (`None` before the first decoding step: any batch may start).
    pub fn batch(&self) -> Option<usize> {
        self.suffix[0].as_ref().and_then(|(k, _)| k.dim(0).ok())
    }

    /// Keeps the samples at `rows` (in that order): the ones still generating.
    pub fn retain(&mut self, rows: &[usize]) -> Result<()> {
        retain_rows(&mut self.suffix, rows)
    }

    pub(crate) fn layers(&mut self) -> impl Iterator<Item = LayerCache<'_>> {
        self.prefix
            .iter()
            .zip(self.suffix.iter_mut())
            .map(|(prefix, suffix)| LayerCache::Shared { prefix, suffix })
    }
}

/// Keeps rows `rows` of every cached `(b, len, h, d)` pair.
pub(crate) fn retain_rows(layers: &mut [Option<(Tensor, Tensor)>], rows: &[usize]) -> Result<()> {
    let Some(Some((k0, _))) = layers.first() else {
        return Ok(());
    };
    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let ids = Tensor::new(ids.as_slice(), k0.device())?;
    for (k, v) in layers.iter_mut().flatten() {
        *k = k.contiguous()?.index_select(&ids, 0)?;
        *v = v.contiguous()?.index_select(&ids, 0)?;
    }
    Ok(())
}

/// One layer's view of the cache a forward pass reads and extends.
pub(crate) enum LayerCache<'a> {
    /// Per-sequence K/V `(b, len, h, d)`, views into `reserved` when it has room; `split_kv`:
    /// single-token steps use flash decoding.
    Dense {
        kv: &'a mut Option<(Tensor, Tensor)>,
        reserved: &'a mut Option<(Tensor, Tensor)>,
        split_kv: bool,
    },
    /// The shared prompt `(1, sp, h, d)` and each sample's suffix `(n, s, h, d)`.
    Shared {
        prefix: &'a (Tensor, Tensor),
        suffix: &'a mut Option<(Tensor, Tensor)>,
    },
}

fn append(slot: &mut Option<(Tensor, Tensor)>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    let kv = match slot.as_ref() {
        Some((pk, pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
        None => (k, v),
    };
    *slot = Some(kv.clone());
    Ok(kv)
}

/// [`append`] into the reserved buffers while they have room: the new positions are written in
/// place and the cache becomes a longer view; past the room (or without one) concatenation.
fn append_reserved(
    slot: &mut Option<(Tensor, Tensor)>,
    reserved: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor)> {
    let len = slot.as_ref().map_or(Ok(0), |(k, _)| k.dim(1))?;
    let t = k.dim(1)?;
    match reserved.as_ref() {
        Some((bk, bv)) if len + t <= bk.dim(1)? && bk.dim(0)? == k.dim(0)? => {
            bk.slice_set(&k.contiguous()?, 1, len)?;
            bv.slice_set(&v.contiguous()?, 1, len)?;
            let kv = (bk.narrow(1, 0, len + t)?, bv.narrow(1, 0, len + t)?);
            *slot = Some(kv.clone());
            Ok(kv)
        }
        _ => {
            *reserved = None;
            append(slot, k, v)
        }
    }
}

impl LayerCache<'_> {
    /// Appends this step's `k`, `v` `(b, t, h, d)` and attends `q` to everything cached, causal
    /// with the diagonal bottom-right (cached keys all visible).
    pub(crate) fn attend(
        self,
        attn: AttentionKind,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        opts: AttnOptions,
    ) -> Result<Tensor> {
        match self {
            LayerCache::Dense {
                kv,
                reserved,
                split_kv,
            } => {
                let (k, v) = append_reserved(kv, reserved, k, v)?;
                // Flash decoding has no block mask: a sparse model decodes through its kind.
                if split_kv && q.dim(1)? == 1 && opts.block_mask.is_none() {
                    let (b, _, hq, _) = q.dims4()?;
                    flash_decoding(q, &k, &v, kv_chunks(b, hq, k.dim(1)?))
                } else {
                    attn.attend(q, &k, &v, opts)
                }
            }
            LayerCache::Shared { prefix, suffix } => {
                if opts.block_mask.is_some() {
                    bail!("gpt2: a shared-prefix cache cannot decode a block-sparse model (config `sparsity`); decode with a KvCache")
                }
                if let Some((sk, _)) = suffix.as_ref() {
                    if sk.dim(0)? != q.dim(0)? {
                        bail!(
                            "gpt2: the shared cache holds {} samples, the input {}",
                            sk.dim(0)?,
                            q.dim(0)?
                        )
                    }
                }
                let (sk, sv) = append(suffix, k, v)?;
                shared_prefix_decode(q, &prefix.0, &prefix.1, Some((&sk, &sv)))
            }
        }
    }
}
