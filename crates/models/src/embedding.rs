//! The input embedding of the training step: `table[ids] + positions`, one fused pass with a
//! row-wise backward, and the hand-off that gives a tied table (GPT-2's `wte`, also its LM head)
//! one gradient buffer for both of its uses.
//!
//! Composed, Candle looks the rows up (`index_select`) and adds the positions in a second pass;
//! in backward `index_add` copies the table's whole gradient (50 257 × width) to add the used
//! rows, after autograd has zero-filled and added the LM head's gradient of the same size. Here
//! forward is one parallel pass and backward adds each used row's gradients, in the order of the
//! tokens (so the same bits as `index_add`, at any thread count), straight into the LM head's
//! gradient buffer when the table is tied through [`TiedGrad`]: the head's loss node hands its
//! `dW` over instead of returning it to autograd, and the table gets one gradient, from here.
//! Other dtypes and devices take the composed ops ([`embed_composed`], the tests' reference).

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The LM head's gradient of a tied table on its way from the loss node to the embedding node
/// of the same graph. Created per forward pass ([`crate::Gpt2::loss`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct TiedGrad(Arc<Mutex<Tied>>);

#[derive(Debug, Default)]
enum Tied {
    /// The loss kept its weight gradient (it returns it to autograd itself).
    #[default]
    Kept,
    /// The head's `dW` (f32, `v × d`, unscaled) and, once the loss node's backward ran, the
    /// upstream factor to scale it by.
    Handed { dw: Vec<f32>, scale: Option<f32> },
    /// Added into the table's gradient by an earlier backward.
    Used,
}

impl TiedGrad {
    /// Called by the loss in forward: `dw` is the head's gradient, no longer the loss node's.
    pub(crate) fn hand(&self, dw: Vec<f32>) {
        *self.lock() = Tied::Handed { dw, scale: None };
    }

    /// Called by the loss node's backward with its upstream gradient.
    pub(crate) fn scale(&self, s: f32) {
        if let Tied::Handed { scale, .. } = &mut *self.lock() {
            *scale = Some(s);
        }
    }

    /// The head's scaled gradient as the start of the table's, or zeros when the loss kept it
    /// or is not part of this backward.
    fn start(&self, len: usize) -> Result<Vec<f32>> {
        let mut t = self.lock();
        match std::mem::replace(&mut *t, Tied::Used) {
            Tied::Kept => {
                *t = Tied::Kept;
                Ok(vec![0f32; len])
            }
            Tied::Handed { dw, scale: None } => {
                // The loss is not on this backward's path: nothing of the head here.
                *t = Tied::Handed { dw, scale: None };
                Ok(vec![0f32; len])
            }
            Tied::Handed {
                mut dw,
                scale: Some(s),
            } => {
                if dw.len() != len {
                    bail!("embedding: the tied head's gradient has {} elements, the table {len}", dw.len())
                }
                if s != 1.0 {
                    dw.par_iter_mut().for_each(|x| *x *= s);
                }
                Ok(dw)
            }
            Tied::Used => bail!(
                "embedding: the tied LM head's gradient was used by an earlier backward of this graph; run the forward pass again"
            ),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tied> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `table[ids] + positions`: `table (v, c)`, `positions (t, c)`, `ids (b, t)` (u32) to `(b, t, c)`.
/// With `tied`, the table's gradient starts from the LM head's that the loss handed over.
pub(crate) fn embed(
    table: &Tensor,
    positions: &Tensor,
    ids: &Tensor,
    tied: Option<&TiedGrad>,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let (v, c) = table.dims2()?;
    if positions.dims() != [t, c] {
        bail!(
            "embedding: `positions` must be (t, c) = ({t}, {c}), got {:?}",
            positions.dims()
        )
    }
    let ok = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous();
    if !(ok(table) && ok(positions) && ids.device().is_cpu()) {
        return embed_composed(table, positions, ids);
    }
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some((i, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= v) {
        bail!("embedding: `input_ids`[{i}] = {id} is not below the vocabulary size {v}")
    }
    let op = Embed {
        ids,
        t,
        tied: tied.cloned(),
    };
    table.apply_op2(positions, op)?.reshape((b, t, c))
}

/// [`embed`] from Candle's differentiable ops (any dtype and device).
pub(crate) fn embed_composed(table: &Tensor, positions: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let c = table.dim(1)?;
    table
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, c))?
        .broadcast_add(&positions.unsqueeze(0)?)
}

/// Rows per parallel task: about 32K elements.
fn block_rows(c: usize) -> usize {
    (32 * 1024 / c.max(1)).max(1)
}

/// The fused op: operands `table (v, c)` and `positions (t, c)`, output `(b·t, c)`.
struct Embed {
    /// `b·t` token ids, checked below `v`.
    ids: Vec<u32>,
    t: usize,
    tied: Option<TiedGrad>,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => bail!("embedding: `{what}` must be contiguous"),
    }
}

// One-line signature: `S` is the CPU storage.
type S = CpuStorage;

impl CustomOp2 for Embed {
    fn name(&self) -> &'static str {
        "fused-embedding"
    }

    fn cpu_fwd(&self, s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> Result<(S, Shape)> {
        let (table, pos) = (f32_slice(s1, l1, "table")?, f32_slice(s2, l2, "positions")?);
        let c = l1.dims()[1];
        let mut out = vec![0f32; self.ids.len() * c];
        let block = block_rows(c);
        out.par_chunks_mut(block * c)
            .enumerate()
            .for_each(|(bi, o)| {
                for (k, row) in o.chunks_exact_mut(c).enumerate() {
                    let r = bi * block + k;
                    let id = self.ids[r] as usize;
                    let (e, p) = (&table[id * c..][..c], &pos[(r % self.t) * c..][..c]);
                    row.iter_mut()
                        .zip(e.iter().zip(p))
                        .for_each(|(o, (&e, &p))| *o = e + p);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), c))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        _pos: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (v, c) = table.dims2()?;
        let (n, t) = (self.ids.len(), self.t);
        let dy = dy
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // The tokens of each id, in token order (a counting sort): `tokens[start[id]..start[id+1]]`.
        let mut start = vec![0usize; v + 1];
        for &id in &self.ids {
            start[id as usize + 1] += 1;
        }
        for i in 0..v {
            start[i + 1] += start[i];
        }
        let mut tokens = vec![0usize; n];
        let mut next = start.clone();
        for (r, &id) in self.ids.iter().enumerate() {
            tokens[next[id as usize]] = r;
            next[id as usize] += 1;
        }
        let mut dtable = match &self.tied {
            Some(tied) => tied.start(v * c)?,
            None => vec![0f32; v * c],
        };
        let block = block_rows(c);
        dtable
            .par_chunks_mut(block * c)
            .enumerate()
            .for_each(|(bi, rows)| {
                for (k, g) in rows.chunks_exact_mut(c).enumerate() {
                    let id = bi * block + k;
                    for &r in &tokens[start[id]..start[id + 1]] {
                        g.iter_mut()
                            .zip(&dy[r * c..][..c])
                            .for_each(|(g, &d)| *g += d);
                    }
                }
            });
        // Positions: each row summed over the batch in order.
        let mut dpos = vec![0f32; t * c];
        dpos.par_chunks_mut(c).enumerate().for_each(|(j, g)| {
            for r in (j..n).step_by(t) {
                g.iter_mut()
                    .zip(&dy[r * c..][..c])
                    .for_each(|(g, &d)| *g += d);
            }
        });
        let dev = table.device();
        Ok((
            Some(Tensor::from_vec(dtable, (v, c), dev)?),
            Some(Tensor::from_vec(dpos, (t, c), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{linear_cross_entropy, linear_cross_entropy_tied, CeOptions};
    use candle_core::{Device, Var};
    use flash_test_support::{rel_err, Rng};

    /// `(table (v, c), positions (t, c))` as variables in `dt`, from the same f32 values.
    fn vars(vals: &[Tensor], dt: DType) -> Result<Vec<Var>> {
        vals.iter()
            .map(|v| Var::from_tensor(&v.to_dtype(dt)?))
            .collect()
    }

    fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
        assert_eq!(a.dims(), b.dims(), "{what}: shape");
        let e = rel_err(a, b);
        assert!(e < tol, "{what}: rel err {e}");
    }

    /// Random tables, positions and ids (a vocabulary small enough that ids repeat, rows not a
    /// multiple of the block): output and both gradients of `sum(y ⊙ r)` against the composed
    /// ops in f64.
    #[test]
    fn embedding_matches_composed() -> Result<()> {
        let mut rng = Rng::new(17);
        for (v, c, b, t) in [(37, 19, 3, 5), (7, 1, 4, 9), (300, 130, 2, 300)] {
            let vals = [
                rng.normal_tensor(&[v, c], 1.0, DType::F32)?,
                rng.normal_tensor(&[t, c], 1.0, DType::F32)?,
            ];
            let ids = rng.ids(b, t, v)?;
            let r = rng.normal_tensor(&[b, t, c], 1.0, DType::F32)?;
            let run = |fused: bool, dt: DType| -> Result<(Tensor, Vec<Tensor>)> {
                let vs = vars(&vals, dt)?;
                let (tab, pos) = (vs[0].as_tensor(), vs[1].as_tensor());
                let y = if fused {
                    embed(tab, pos, &ids, None)?
                } else {
                    embed_composed(tab, pos, &ids)?
                };
                let g = (&y * r.to_dtype(dt)?)?.sum_all()?.backward()?;
                let grads = vs.iter().map(|v| g.get(v).cloned().expect("gradient"));
                Ok((y, grads.collect()))
            };
            let (yf, gf) = run(true, DType::F32)?;
            let (yc, gc) = run(false, DType::F64)?;
            assert_eq!(yf.dtype(), DType::F32);
            assert_close(&format!("{v}x{c} output"), &yf, &yc, 1e-6);
            assert_close(&format!("{v}x{c} d table"), &gf[0], &gc[0], 1e-5);
            assert_close(&format!("{v}x{c} d positions"), &gf[1], &gc[1], 1e-5);
        }
        Ok(())
    }

    /// A table tied to an LM head: the loss hands its weight gradient to the embedding, which
    /// starts the table's gradient from it. `loss·k` for an upstream factor `k ≠ 1`: the table's
    /// gradient (both uses), the positions' and the hidden path's, against the untied composed
    /// ops in f64.
    #[test]
    fn tied_table_gets_both_gradients() -> Result<()> {
        let mut rng = Rng::new(5);
        let (v, c, b, t) = (41, 12, 3, 7);
        let vals = [
            rng.normal_tensor(&[v, c], 1.0, DType::F32)?,
            rng.normal_tensor(&[t, c], 1.0, DType::F32)?,
        ];
        let ids = rng.ids(b, t, v)?;
        let targets = rng.ids(1, b * t, v)?.flatten_all()?;
        let opts = CeOptions::default();
        let run = |fused: bool, dt: DType| -> Result<(Tensor, Vec<Tensor>)> {
            let vs = vars(&vals, dt)?;
            let (tab, pos) = (vs[0].as_tensor(), vs[1].as_tensor());
            let tied = TiedGrad::default();
            let x = if fused {
                embed(tab, pos, &ids, Some(&tied))?
            } else {
                embed_composed(tab, pos, &ids)?
            };
            // A nonlinearity between the two uses, so the hidden path's gradient matters.
            let h = x.tanh()?.reshape((b * t, c))?;
            let loss = if fused {
                linear_cross_entropy_tied(&h, tab, None, &targets, &opts, Some(&tied))?
            } else {
                linear_cross_entropy(&h, tab, None, &targets, &opts)?
            };
            let g = loss.affine(3.0, 0.0)?.backward()?;
            let grads = vs.iter().map(|v| g.get(v).cloned().expect("gradient"));
            Ok((loss, grads.collect()))
        };
        let (lf, gf) = run(true, DType::F32)?;
        let (lc, gc) = run(false, DType::F64)?;
        assert_close("loss", &lf, &lc, 1e-5);
        assert_close("tied d table", &gf[0], &gc[0], 1e-5);
        assert_close("d positions", &gf[1], &gc[1], 1e-5);
        Ok(())
    }

    /// The head's gradient is added once: a second backward through the same tied graph is an
    /// error, not a table gradient without the head's part.
    #[test]
    fn second_backward_through_a_tied_graph_is_an_error() -> Result<()> {
        let mut rng = Rng::new(8);
        let tab = Var::from_tensor(&rng.normal_tensor(&[9, 4], 1.0, DType::F32)?)?;
        let pos = rng.normal_tensor(&[3, 4], 1.0, DType::F32)?;
        let ids = rng.ids(2, 3, 9)?;
        let targets = rng.ids(1, 6, 9)?.flatten_all()?;
        let tied = TiedGrad::default();
        let h = embed(tab.as_tensor(), &pos, &ids, Some(&tied))?.reshape((6, 4))?;
        let (w, opts) = (tab.as_tensor(), CeOptions::default());
        let loss = linear_cross_entropy_tied(&h, w, None, &targets, &opts, Some(&tied))?;
        loss.backward()?;
        let e = loss.backward().unwrap_err().to_string();
        assert!(e.contains("earlier backward"), "{e}");
        Ok(())
    }

    /// Out-of-range ids and mis-shaped positions are errors naming the argument; other dtypes
    /// take the composed ops.
    #[test]
    fn bad_input_and_fallback() -> Result<()> {
        let mut rng = Rng::new(2);
        let tab = rng.normal_tensor(&[5, 2], 1.0, DType::F32)?;
        let pos = rng.normal_tensor(&[2, 2], 1.0, DType::F32)?;
        let bad = Tensor::new(&[[1u32, 5]], &Device::Cpu)?;
        let e = embed(&tab, &pos, &bad, None).unwrap_err().to_string();
        assert!(e.contains("input_ids") && e.contains("5"), "{e}");
        let ids = rng.ids(1, 2, 5)?;
        let short = pos.narrow(0, 0, 1)?;
        let e = embed(&tab, &short, &ids, None).unwrap_err().to_string();
        assert!(e.contains("positions"), "{e}");
        let (tab, pos) = (tab.to_dtype(DType::F64)?, pos.to_dtype(DType::F64)?);
        let y = embed(&tab, &pos, &ids, None)?;
        assert_eq!(y.dtype(), DType::F64);
        assert_close(
            "f64 fallback",
            &y,
            &embed_composed(&tab, &pos, &ids)?,
            1e-12,
        );
        Ok(())
    }
}
